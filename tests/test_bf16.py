"""The bf16 inference forward (AVX512-BF16 ``vdpbf16ps``): bf16 feats and
weights, products summed in float32. Accuracy: within float32 rounding of the
exact conv of the bf16-rounded inputs; against the float32 conv, the bf16
rounding of the inputs (about 2e-3 of the largest output)."""

from __future__ import annotations

import pytest
import torch

import pointsparse as ps
from pointsparse import _ext
from pointsparse import nn as spnn
from pointsparse.models import MinkUNet
from pointsparse.nn import _engine
from pointsparse.nn import functional as F
from reference import conv_sum

pytestmark = pytest.mark.skipif(not _ext.core.conv_bf16(), reason="the CPU has no AVX512-BF16")

CHANNELS = [1, 5, 6, 7, 13, 15, 16, 17, 31, 33, 64, 100]


def _cloud(n=1500, c=4, seed=0, extent=14):
    g = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.cat([torch.zeros(n, 1, dtype=torch.int64),
                                     torch.randint(0, extent, (n, 3), generator=g)], 1), dim=0).int()
    return ps.SparseTensor(torch.randn(len(coords), c, generator=g), coords)


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("c_in", CHANNELS)
def test_forward_bf16_against_exact_and_float32(c_in):
    c_out = CHANNELS[(CHANNELS.index(c_in) + 7) % len(CHANNELS)]
    x = _cloud(c=c_in, seed=c_in)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(27, c_in, c_out, generator=g) / c_in ** 0.5
    b = torch.randn(c_out, generator=g)
    fb, wb = x.feats.bfloat16(), w.bfloat16()
    outs = []
    for nt, relu in ((1, False), (2, False), (2, True)):
        out = torch.full((kmap.num_out, c_out), float("nan"))
        plan.core.forward_bf16(fb.view(torch.int16).numpy(), wb.view(torch.int16).numpy(), b.numpy(), out.numpy(),
                               nt, relu)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], torch.relu(outs[1]))
    exact = conv_sum(fb.double(), wb.double(), kmap) + b.double()
    assert _rel(outs[0], exact) < 1e-6
    assert _rel(outs[0], conv_sum(x.feats, w, kmap) + b) < 1.5e-2


def test_forward_bf16_on_a_map_without_identity():
    """A k2 s2 map (no identity offset: the rows start as the bias, then every
    offset adds) and a k3 map with the bias absent, against the exact sum."""
    x = _cloud(c=24, seed=5)
    g = torch.Generator().manual_seed(2)
    for kmap, bias in ((ps.kmap.get_kmap(x, 2, stride=2), torch.randn(40, generator=g)),
                       (ps.kmap.get_kmap(x, 3), None)):
        plan = _engine.make_fused_plan(kmap)
        w = (torch.randn(kmap.kernel_volume, 24, 40, generator=g) / 5).bfloat16()
        fb = x.feats.bfloat16()
        out = torch.full((kmap.num_out, 40), float("nan"))
        plan.core.forward_bf16(fb.view(torch.int16).numpy(), w.view(torch.int16).numpy(),
                               None if bias is None else bias.numpy(), out.numpy(), 2)
        exact = conv_sum(fb.double(), w.double(), kmap) + (0 if bias is None else bias.double())
        assert _rel(out, exact) < 1e-6


def test_forward_bf16_rounds_its_output_as_torch_does():
    """out_bf16 (each block rounded in the kernel) equals out.to(bfloat16) bit
    for bit, NaN rows, infinities and values near the rounding ties included."""
    x = _cloud(c=16, seed=7)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    g = torch.Generator().manual_seed(3)
    feats = x.feats.clone()
    feats[0] = float("nan")
    feats[1, :3] = torch.tensor([float("inf"), 1e-39, 3.0e38])
    fb, wb = feats.bfloat16(), (torch.randn(27, 16, 24, generator=g) * 4).bfloat16()
    for nt, relu in ((1, False), (2, True)):
        out = torch.empty(kmap.num_out, 24)
        rounded = torch.empty(kmap.num_out, 24, dtype=torch.bfloat16)
        plan.core.forward_bf16(fb.view(torch.int16).numpy(), wb.view(torch.int16).numpy(), None, out.numpy(), nt,
                               relu, out_bf16=rounded.view(torch.int16).numpy())
        assert out.isnan().any() and out.isinf().any()
        assert torch.equal(rounded.view(torch.int16), out.to(torch.bfloat16).view(torch.int16))
    bits = fb.view(torch.int16).numpy()
    for bad, error, match in ((torch.empty(kmap.num_out, 24, dtype=torch.float32).numpy(), ValueError, "out_bf16"),
                              (torch.empty(kmap.num_out, 23, dtype=torch.int16).numpy(), ValueError, "out_bf16"),
                              (torch.empty(3, 24, dtype=torch.int16).numpy(), ValueError, "out_bf16"),
                              ([1, 2], TypeError, "out_bf16")):
        with pytest.raises(error, match=match):
            plan.core.forward_bf16(bits, wb.view(torch.int16).numpy(), None, out.numpy(), 1, False, out_bf16=bad)


def test_conv3d_runs_bf16_in_inference_only():
    x = _cloud(c=8)
    w = torch.randn(27, 8, 16) / 8 ** 0.5
    xb, wb = x.with_feats(x.feats.bfloat16()), w.bfloat16()
    with torch.no_grad():
        y = F.conv3d(xb, wb, 3, relu=True)
    assert y.feats.dtype == torch.bfloat16
    exact = torch.relu(conv_sum(xb.feats.double(), wb.double(), ps.kmap.get_kmap(x, 3)))
    assert _rel(y.feats, exact) < 2 ** -8  # one bf16 rounding of a float32 sum
    wg = wb.clone().requires_grad_()  # with a gradient: the torch path, still bf16
    assert not _engine.runs_bf16(xb.feats, wg, None)
    assert F.conv3d(xb, wg, 3).feats.dtype == torch.bfloat16


def test_forward_bf16_checks_its_arrays():
    x = _cloud(c=3)
    plan = _engine.make_fused_plan(ps.kmap.get_kmap(x, 3))
    w = torch.zeros(27, 3, 4, dtype=torch.bfloat16).view(torch.int16).numpy()
    out = torch.empty(len(x), 4).numpy()
    with pytest.raises(ValueError, match="feats must hold bf16 bits"):
        plan.core.forward_bf16(x.feats.numpy(), w, None, out, 1)
    with pytest.raises(ValueError, match="out must be float32"):
        plan.core.forward_bf16(x.feats.bfloat16().view(torch.int16).numpy(), w, None, out.astype("float64"), 1)


def test_minkunet_bf16_inference_accuracy():
    """A fused MinkUNet (BN folded) run in bf16 against its float32 eval
    output: the accuracy stated in bench/RESULTS.md."""
    torch.manual_seed(0)
    net = MinkUNet(4, 6, cr=0.25).eval()
    x = _cloud(4000, 4, extent=40)
    with torch.no_grad():
        ref = net(x).feats
        fused = spnn.fuse_for_inference(net).to(torch.bfloat16)
        out = fused(ps.SparseTensor(x.feats.bfloat16(), x.coords)).feats
    assert out.dtype == torch.bfloat16
    err = _rel(out, ref)
    assert err < 5e-2, err
    assert (out.float().argmax(1) == ref.argmax(1)).float().mean() > 0.9
