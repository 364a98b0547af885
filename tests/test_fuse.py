"""Inference fusion: BatchNorm folded into the conv before it, ReLU in the
conv kernel's store; a fused MinkUNet gives model.eval()'s output."""

from __future__ import annotations

import pytest
import torch

import pointsparse as ps
from pointsparse import _ext
from pointsparse import nn as spnn
from pointsparse.models import MinkUNet
from pointsparse.nn import _engine


def _cloud(n=600, channels=4, seed=0, extent=20):
    g = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.cat([torch.zeros(n, 1, dtype=torch.int64),
                                     torch.randint(0, extent, (n, 3), generator=g)], 1), dim=0).int()
    return ps.SparseTensor(torch.randn(len(coords), channels, generator=g), coords)


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, spnn.BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)


@pytest.mark.parametrize("isa", _ext.core.runnable_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_in_the_kernel_store_equals_relu_after(isa, dtype):
    x = _cloud(channels=5)
    x = x.with_feats(x.feats.to(dtype))
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    w = torch.randn(27, 5, 17, dtype=dtype)
    b = torch.randn(17, dtype=dtype)
    plain, fused = torch.empty(len(x), 17, dtype=dtype), torch.empty(len(x), 17, dtype=dtype)
    for nt in (1, 2):
        plan.core.forward(x.feats.numpy(), w.numpy(), b.numpy(), plain.numpy(), nt, isa)
        plan.core.forward(x.feats.numpy(), w.numpy(), b.numpy(), fused.numpy(), nt, isa, True)
        assert torch.equal(fused, torch.relu(plain)) and (plain < 0).any()


def test_conv3d_relu_with_and_without_gradients():
    """relu=True: fused where no gradient is needed, ReLU after the autograd
    conv otherwise; the same values, and gradients through the ReLU."""
    x = _cloud(channels=3)
    w = torch.randn(27, 3, 8, requires_grad=True)
    ref = torch.relu(spnn.functional.conv3d(x, w, 3).feats)
    y = spnn.functional.conv3d(x, w, 3, relu=True)
    assert y.feats.requires_grad and torch.equal(y.feats, ref)
    y.feats.sum().backward()
    g = w.grad.clone()
    w.grad = None
    ref.sum().backward()
    assert torch.equal(g, w.grad)
    with torch.no_grad():
        assert torch.equal(spnn.functional.conv3d(x, w, 3, relu=True).feats, ref)


def test_fold_batchnorm_checks():
    conv = spnn.Conv3d(3, 4, 3)
    with pytest.raises(ValueError, match="running statistics"):
        spnn.fold_batchnorm(conv, spnn.BatchNorm(4, track_running_stats=False))
    with pytest.raises(ValueError, match="features"):
        spnn.fold_batchnorm(conv, spnn.BatchNorm(5))
    with pytest.raises(TypeError, match="model must be"):
        spnn.fuse_for_inference("net")


@pytest.mark.parametrize("cr", [0.25, 0.5])
def test_fused_minkunet_equals_eval(cr):
    """Every conv-BN(-ReLU) of MinkUNet folded: the same logits as
    model.eval() to float32 rounding, the original model untouched, no BN and
    no ReLU left in a conv's Sequential."""
    torch.manual_seed(0)
    net = MinkUNet(4, 6, cr=cr)
    _randomise_bn(net)
    net.eval()
    x = _cloud(3000, 4, extent=40)
    with torch.no_grad():
        ref = net(x).feats
        fused = spnn.fuse_for_inference(net)
        out = fused(ps.SparseTensor(x.feats, x.coords)).feats
    assert not fused.training
    assert not any(isinstance(m, spnn.BatchNorm) for m in fused.modules())
    assert sum(isinstance(m, spnn.Conv3d) and m.relu for m in fused.modules()) > 10
    assert any(isinstance(m, spnn.BatchNorm) for m in net.modules())  # the original keeps its BN
    scale = ref.abs().max()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(scale))
    # float64: the folding itself is exact up to float64 rounding
    net64, x64 = net.double(), x.with_feats(x.feats.double())
    with torch.no_grad():
        ref64 = net64(x64).feats
        out64 = spnn.fuse_for_inference(net64)(ps.SparseTensor(x64.feats, x64.coords)).feats
    torch.testing.assert_close(out64, ref64, rtol=1e-10, atol=1e-10)
