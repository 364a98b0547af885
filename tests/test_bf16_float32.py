"""bf16 inference where the AVX512-BF16 kernels do not run (a CPU without
them, or a kernel region): the float32 kernels on the exactly widened
inputs, the result rounded once to bfloat16. Runs on every CPU; the
conv_bf16 check is patched off so that the float32 path is the one tested
on machines that have the bf16 kernels too."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_16_bit_conv_in_training_runs_the_float32_kernels_on_its_widened_values(dtype, transposed):
    """A bf16 / fp16 conv with a gradient ran the torch path: each offset's product rounded to the 16-bit dtype
    and summed there, so a model's training forward differed from its inference (one rounding of a float32
    sum), and from the same model compiled. It now runs as a conv in autocast's precision does: the float32
    kernels on the exactly widened values, the output rounded once, the gradients the float32 engine's rounded
    to the inputs' dtype."""
    coords = random_coords(900, 12, seed=5)
    g = torch.Generator().manual_seed(6)
    x = ps.SparseTensor(torch.randn(len(coords), 8, generator=g).to(dtype), coords)
    stride = 1
    if transposed:  # (the transposed conv of a stride-2 one, back onto these coords)
        x = F.conv3d(x, torch.zeros(8, 8, 8, dtype=dtype), 2, stride=2)
        x = x.with_feats(torch.randn(x.feats.shape, generator=g).to(dtype))
        stride = 2
    w = (torch.randn(8 if transposed else 27, 8, 16, generator=g) / 8 ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(16, generator=g).to(dtype).requires_grad_()
    feats = x.feats.clone().requires_grad_()
    k = 2 if transposed else 3
    y = F.conv3d(x.with_feats(feats), w, k, stride=stride, bias=b, transposed=transposed, relu=True)
    up = torch.randn(y.feats.shape, generator=g).to(dtype)
    y.feats.backward(up)
    wide_feats = x.feats.float().requires_grad_()
    wide_w, wide_b = w.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    wide = F.conv3d(x.with_feats(wide_feats), wide_w, k, stride=stride, bias=wide_b, transposed=transposed,
                    relu=True)
    wide.feats.backward(up.float())
    assert y.feats.dtype == dtype and torch.equal(y.feats, wide.feats.detach().to(dtype))
    assert torch.equal(feats.grad, wide_feats.grad.to(dtype))
    assert torch.equal(w.grad, wide_w.grad.to(dtype)) and torch.equal(b.grad, wide_b.grad.to(dtype))
    with torch.no_grad():  # inference: within one rounding of a float32 sum (bf16: its own kernels' order)
        z = F.conv3d(x, w.detach(), k, stride=stride, bias=b.detach(), transposed=transposed, relu=True)
    assert _rel(z.feats, y.feats.detach()) < (2 ** -7 if dtype == torch.bfloat16 else 2 ** -9)


def test_a_bf16_conv_in_training_compiled_gives_eagers_bits():
    """torch.compile of a bf16 conv in training widened nothing and ran the bf16 kernels (its own rounding)
    while eager ran the torch path: the two differed by bf16 roundings. Both now run the float32 kernels on
    the widened values: equal outputs and gradients."""
    coords = random_coords(400, 9, seed=7)
    g = torch.Generator().manual_seed(8)
    x = ps.SparseTensor(torch.randn(len(coords), 8, generator=g).bfloat16(), coords)
    conv = ps.nn.Conv3d(8, 16, 3, bias=True).bfloat16()
    results = []
    for run in (conv, torch.compile(conv, backend="aot_eager", fullgraph=True)):
        conv.zero_grad(set_to_none=True)
        out = run(x).feats
        out.float().square().sum().backward()
        results.append((out.detach(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled)


def test_a_bf16_residual_is_summed_before_the_one_rounding_without_the_bf16_kernels(monkeypatch):
    """Without AVX512-BF16 a bf16 inference conv's residual was added after its float32 sum had been rounded
    to bf16: a second rounding, as large as the sum's, where the residual cancelled the sum (a fuzz day
    seed's case, 20261208 #8 on an AMD Zen 3). The residual now joins the float32 store, widened, before the
    ReLU and the one rounding, as the AVX512-BF16 kernels sum it: eager, the inference operator and a
    compiled graph alike, bit for bit the float32 engine's sum rounded once; with a gradient too."""
    monkeypatch.setattr(_ext.core, "conv_bf16", lambda: False)
    coords = random_coords(700, 11, seed=9)
    g = torch.Generator().manual_seed(10)
    x = ps.SparseTensor((torch.randn(len(coords), 8, generator=g) * 4).bfloat16(), coords)
    w = (torch.randn(27, 8, 16, generator=g) / 8 ** 0.5).bfloat16()
    b = torch.randn(16, generator=g).bfloat16()
    kmap = ps.kmap.get_kmap(x, 3)
    summed = conv_sum(x.feats.double(), w.double(), kmap) + b.double()
    magnitude = conv_sum(x.feats.double().abs(), w.double().abs(), kmap) + b.double().abs()
    # a residual that cancels the sum but for a small part: the output is small beside the sum
    res = ps.SparseTensor((-summed + 0.01 * torch.randn(summed.shape, generator=g).double()).bfloat16(),
                          kmap.out_coords)
    exact = torch.relu(summed + res.feats.double())
    wide = F.conv3d(x.with_feats(x.feats.float()), w.float(), 3, bias=b.float(), relu=True,
                    add=res.with_feats(res.feats.float())).feats.to(torch.bfloat16)
    args = (x.feats, w, b, kmap.out_coords, kmap.in_idx, kmap.out_idx, kmap.sizes, ps.ops.key_to_list(kmap.key))
    with torch.no_grad():
        eager = F.conv3d(x, w, 3, bias=b, relu=True, add=res).feats
        op = ps.ops.conv_inference(*args, res.feats, True)
        compiled = torch.compile(lambda s, r: F.conv3d(s, w, 3, bias=b, relu=True, add=r).feats,
                                 backend="eager", fullgraph=True)(x, res)
    for name, got in (("eager", eager), ("operator", op), ("compiled", compiled)):
        assert got.dtype == torch.bfloat16 and torch.equal(got, wide), name
        # one rounding of the output (2^-9 of it) and float32's of the products' sum (2^-24 of each partial sum):
        # not a bf16 one of the sum
        off = (got.double() - exact).abs() - (2.0 ** -8 * exact.abs() + 2.0 ** -17 * magnitude)
        assert float(off.max()) <= 0, name
    # with a gradient (training: the float32 kernels on the widened values): eager's bits in the graph
    wg = w.clone().requires_grad_()
    rg = res.feats.clone().requires_grad_()
    outs = []
    for fn in (F.conv3d, torch.compile(F.conv3d, backend="aot_eager", fullgraph=True)):
        wg.grad = rg.grad = None
        out = fn(x, wg, 3, bias=b, relu=True, add=res.with_feats(rg)).feats
        out.float().square().sum().backward()
        outs.append((out.detach(), wg.grad.clone(), rg.grad.clone()))
    for eager_t, compiled_t in zip(*outs):
        assert torch.equal(eager_t, compiled_t)
    assert torch.equal(outs[0][0], wide)
