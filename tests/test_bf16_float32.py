"""bf16 inference where the AVX512-BF16 kernels do not run (a CPU without
them, or a kernel region): the float32 kernels on the exactly widened
inputs, the result rounded once to bfloat16. Runs on every CPU; the
conv_bf16 check is patched off so that the float32 path is the one tested
on machines that have the bf16 kernels too."""

from __future__ import annotations

import torch

import pointsparse as ps
from pointsparse import _ext
from pointsparse.nn import _engine
from pointsparse.nn import functional as F
from reference import conv_sum, random_coords


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_bf16_inference_through_the_float32_kernels(monkeypatch):
    monkeypatch.setattr(_ext.core, "conv_bf16", lambda: False)
    coords = random_coords(900, 12, seed=3)
    g = torch.Generator().manual_seed(4)
    x = ps.SparseTensor(torch.randn(len(coords), 8, generator=g).bfloat16(), coords)
    w = (torch.randn(27, 8, 16, generator=g) / 8 ** 0.5).bfloat16()
    b = torch.randn(16, generator=g).bfloat16()
    kmap = ps.kmap.get_kmap(x, 3)
    assert _engine.bf16_inference(x.feats, w, b) and not _engine.runs_bf16(x.feats, w, b)
    with torch.no_grad():
        y = F.conv3d(x, w, 3, bias=b, relu=True)
        cross = F.conv3d(x, w, 3, kernel_region="cross")
    assert y.feats.dtype == torch.bfloat16 and cross.feats.dtype == torch.bfloat16
    exact = torch.relu(conv_sum(x.feats.double(), w.double(), kmap) + b.double())
    assert _rel(y.feats, exact) < 2 ** -8  # one bf16 rounding of a float32 sum
    # the float32 engine on the same (exactly widened) values, rounded once: bit for bit
    wide = F.conv3d(x.with_feats(x.feats.float()), w.float(), 3, bias=b.float(), relu=True).feats
    assert torch.equal(y.feats, wide.to(torch.bfloat16))
    keep = F.region_of(3, "cross")
    exact_cross = conv_sum(x.feats.double(), w.double() * keep.double().view(-1, 1, 1), kmap)
    assert _rel(cross.feats, exact_cross) < 2 ** -8
    wg = w.clone().requires_grad_()  # with a gradient: not inference, the torch path, still bf16
    assert not _engine.bf16_inference(x.feats, wg, None)
    assert F.conv3d(x, wg, 3).feats.dtype == torch.bfloat16
