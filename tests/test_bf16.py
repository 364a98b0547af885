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
from reference import conv_sum, random_cloud as _cloud, rel_error as _rel

pytestmark = pytest.mark.skipif(not _ext.core.conv_bf16(), reason="the CPU has no AVX512-BF16")


@pytest.fixture(autouse=True)
def _vdpbf16ps_forms(monkeypatch):
    """These tests are the vdpbf16ps forms': the engine never takes the AMX
    tiles here (tests/test_bf16_tiles.py tests those)."""
    monkeypatch.setattr(_engine, "BF16_TILES", False)

CHANNELS = [1, 5, 6, 7, 13, 15, 16, 17, 31, 33, 64, 100]


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


def _vector_pruned(k, c_in, c_out, keep, g, zero_offsets=()):
    """A (k, c_in, c_out) weight with about ``keep`` of its float32 engine
    vectors (input channel x 16 output columns) nonzero, every offset but
    ``zero_offsets`` (all zero) holding one at least."""
    w = torch.randn(k, c_in, c_out, generator=g) / c_in ** 0.5
    panels = -(-c_out // 16)
    mask = (torch.rand(k, c_in, panels, generator=g) < keep).repeat_interleave(16, 2)[:, :, :c_out]
    w = w * mask
    w[:, 0, 0] = 0.5  # every offset holds a nonzero
    w[list(zero_offsets)] = 0
    return w


def _forward_bf16(plan, fb, wb, bias, c_out, nt, relu, density, add=None):
    """``(what ran, float32 out, rounded out)``; the same call without the
    float32 out (its sums kept block by block) must round to the same bits."""
    out = torch.full((plan.num_out, c_out), float("nan"))
    rounded = torch.empty(plan.num_out, c_out, dtype=torch.bfloat16)
    blocks = torch.empty(plan.num_out, c_out, dtype=torch.bfloat16)
    args = (fb.view(torch.int16).numpy(), wb.view(torch.int16).numpy(), None if bias is None else bias.numpy())
    kwargs = dict(vector_density=density, add=None if add is None else add.view(torch.int16).numpy())
    ran = plan.core.forward_bf16(*args, out.numpy(), nt, relu, out_bf16=rounded.view(torch.int16).numpy(), **kwargs)
    assert plan.core.forward_bf16(*args, None, nt, relu, out_bf16=blocks.view(torch.int16).numpy(), **kwargs) == ran
    assert torch.equal(blocks.view(torch.int16), rounded.view(torch.int16))
    return ran, out, rounded


def test_forward_bf16_without_a_float32_out_rounds_the_same_bits():
    """out=None (the float32 sums kept in a block of each thread's, as
    inference runs it): the same rounded bits as with a float32 out, over
    many blocks a thread, for 1, 2 and 3 threads, in the dense, offset and
    vector forms, with bias, residual and ReLU; neither out nor out_bf16, or
    the two sharing memory, is a ValueError."""
    x = _cloud(n=9000, c=24, seed=4, extent=30)
    assert len(x) > 12 * 512  # blocks of 512 rows: several a thread
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    g = torch.Generator().manual_seed(4)
    fb, bias = x.feats.bfloat16(), torch.randn(40, generator=g)
    residual = torch.randn(kmap.num_out, 40, generator=g).bfloat16()
    seen = set()
    for zero in ((), (2, 5, _engine.identity_offset(kmap))):
        wb = _vector_pruned(27, 24, 40, 0.4, g, zero).bfloat16()
        for nt in (1, 2, 3):
            for density in (-1.0, 1.0):
                seen.add(_forward_bf16(plan, fb, wb, bias, 40, nt, True, density, add=residual)[0])
                seen.add(_forward_bf16(plan, fb, wb, None, 40, nt, False, density)[0])
    assert seen == {"dense", "offsets", "vector"}
    small = _cloud(n=40, c=24, seed=5, extent=4)  # fewer rows than a block: a block of sums that short
    assert len(small) < 512
    small_plan = _engine.make_fused_plan(ps.kmap.get_kmap(small, 3))
    for nt in (1, 3):
        _forward_bf16(small_plan, small.feats.bfloat16(), wb, bias, 40, nt, True, -1.0)
    bits, w = fb.view(torch.int16).numpy(), wb.view(torch.int16).numpy()
    with pytest.raises(ValueError, match="needs out, out_bf16 or both"):
        plan.core.forward_bf16(bits, w, None, None, 1)
    out = torch.empty(kmap.num_out, 40)
    with pytest.raises(ValueError, match="out_bf16 must not share memory with out"):
        plan.core.forward_bf16(bits, w, None, out.numpy(), 1, out_bf16=out.view(torch.int16).view(-1)[:kmap.num_out * 40].view(kmap.num_out, 40).numpy())
    with pytest.raises(ValueError, match="out_bf16 must have num_out"):
        plan.core.forward_bf16(bits, w, None, None, 1, out_bf16=torch.empty(5, 40, dtype=torch.int16).numpy())
    with pytest.raises(TypeError, match="out_bf16 must be a numpy array"):
        plan.core.forward_bf16(bits, w, None, None, 1, out_bf16=[1, 2])


@pytest.mark.parametrize("c_in,c_out", [(1, 5), (2, 16), (7, 17), (13, 40), (16, 8), (33, 32), (64, 64)])
def test_forward_bf16_vector_form_equals_the_dense_form(c_in, c_out):
    """The vector-sparse form (only the listed (offset, channel pair, 16
    columns) vectors) sums the same products in the same order as the dense
    form: equal bit for bit, for any thread count, with and without the
    ReLU, the bias and the identity offset; and within float32 rounding of
    the exact sum. Odd c_in: the last pair holds one channel."""
    x = _cloud(c=c_in, seed=c_in + c_out)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    g = torch.Generator().manual_seed(c_in * 100 + c_out)
    identity = _engine.identity_offset(kmap)
    for zero, bias in (((), torch.randn(c_out, generator=g)), ((3, identity), None)):
        wb = _vector_pruned(27, c_in, c_out, 0.4, g, zero).bfloat16()
        fb = x.feats.bfloat16()
        runs = {}
        for nt, relu in ((1, False), (2, False), (2, True)):
            dense = _forward_bf16(plan, fb, wb, bias, c_out, nt, relu, -1.0)
            vector = _forward_bf16(plan, fb, wb, bias, c_out, nt, relu, 1.0)
            assert dense[0] == ("offsets" if zero else "dense") and vector[0] == "vector"
            assert torch.equal(dense[1], vector[1]) and torch.equal(dense[2], vector[2])
            runs[(nt, relu)] = vector[1]
        assert torch.equal(runs[(1, False)], runs[(2, False)])
        assert torch.equal(runs[(2, True)], torch.relu(runs[(2, False)]))
        exact = conv_sum(fb.double(), wb.double(), kmap) + (0 if bias is None else bias.double())
        assert _rel(runs[(1, False)], exact) < 1e-6


def test_forward_bf16_decides_by_the_density_of_bf16_vectors():
    """Density = listed (offset, channel pair, 16 columns) vectors / (kept
    offsets x pairs x panels): the vector form runs at or below the
    threshold. A pair is listed when either of its channels holds a nonzero
    (-0.0 is zero, NaN is not); an all-zero offset is never counted."""
    x = _cloud(c=8, seed=11)
    plan = _engine.make_fused_plan(ps.kmap.get_kmap(x, 3))
    fb = x.feats.bfloat16()
    w = torch.zeros(27, 8, 32)
    w[:, 0, :16] = 1.0       # pair 0, panel 0 on every offset
    w[:, 3, 16:] = -2.0      # pair 1 (channels 2, 3), panel 1
    w[5] = 0                 # an offset left out
    w[7, 6, 20] = -0.0       # a negative zero lists nothing
    # 26 offsets kept x 4 pairs x 2 panels = 208; listed 2 per offset = 52: density 0.25
    for threshold, ran in ((0.25, "vector"), (0.2499, "offsets"), (-1.0, "offsets")):
        assert _forward_bf16(plan, fb, w.bfloat16(), None, 32, 1, False, threshold)[0] == ran
    w[7, 6, 20] = float("nan")  # a NaN is listed: 53 / 208 > 0.25
    assert _forward_bf16(plan, fb, w.bfloat16(), None, 32, 1, False, 0.25)[0] == "offsets"
    assert _forward_bf16(plan, fb, torch.randn(27, 8, 32).bfloat16(), None, 32, 1, False, 0.9)[0] == "dense"
    with pytest.raises(ValueError, match="vector_density"):
        _forward_bf16(plan, fb, w.bfloat16(), None, 32, 1, False, float("nan"))


def test_bf16_vector_threshold_by_columns():
    """Always the vector form where the dense form's last 32-column tile
    would hold 16 columns or fewer; elsewhere the measured threshold."""
    assert [_engine.bf16_vector_threshold(c) for c in (8, 16, 24, 32, 48, 64, 96, 100)] == \
        [1.0, 1.0, _engine.BF16_VECTOR_DENSITY, _engine.BF16_VECTOR_DENSITY, 1.0, _engine.BF16_VECTOR_DENSITY,
         _engine.BF16_VECTOR_DENSITY, 1.0]


def test_vector_pruned_minkunet_in_bf16_equals_its_dense_bf16_run(monkeypatch):
    """A fused MinkUNet with 75% of its engine vectors pruned, run in bf16:
    the outputs with the vector forms (the engine's choice) equal those with
    every conv forced to the dense form, bit for bit; the vector form ran."""
    from pointsparse import prune

    torch.manual_seed(1)
    net = spnn.fuse_for_inference(MinkUNet(4, 6, cr=0.25).eval())
    for module in net.modules():
        if isinstance(module, spnn.Conv3d) and module.weight.shape[0] > 1:
            prune.panel_structured(module, "weight", 0.75, square=True)
            prune.remove(module, "weight")
    net = net.to(torch.bfloat16)
    x = _cloud(4000, 4, extent=40)
    xb = ps.SparseTensor(x.feats.bfloat16(), x.coords)
    first = next(m for m in net.modules() if isinstance(m, spnn.Conv3d) and m.weight.shape[0] > 1)
    assert first.weight.shape[2] == 8  # cr=0.25: 8 output columns, where the vector form always runs
    plan = _engine.make_fused_plan(ps.kmap.get_kmap(ps.SparseTensor(xb.feats[:, :1], x.coords), 3))
    ran = _forward_bf16(plan, torch.zeros(len(x), first.weight.shape[1], dtype=torch.bfloat16), first.weight,
                        None, 8, 1, False, _engine.bf16_vector_threshold(8))[0]
    assert ran == "vector"
    seen = []
    real = _engine.bf16_vector_threshold
    monkeypatch.setattr(_engine, "bf16_vector_threshold", lambda cols: seen.append(cols) or real(cols))
    with torch.no_grad():
        out = net(xb).feats
    assert seen
    monkeypatch.setattr(_engine, "bf16_vector_threshold", lambda cols: -1.0)
    with torch.no_grad():
        dense = net(ps.SparseTensor(x.feats.bfloat16(), x.coords)).feats
    assert out.dtype == torch.bfloat16 and torch.equal(out.view(torch.int16), dense.view(torch.int16))


def test_bf16_cost_counts_what_the_bf16_kernels_run():
    """sparsity_report's executed FLOPs for a bfloat16 weight (through
    F.engine_cost): the bf16 kernels' choice and the products they run, a
    listed channel pair counting both its channels (one where c_in is odd
    and it is the last)."""
    w = torch.zeros(27, 7, 24)
    w[:, 0, :16] = 1.0   # pair 0, panel 0 (16 columns)
    w[:, 6, 16:] = 1.0   # pair 3 (channel 6 alone), panel 1 (8 columns)
    w[4] = 0
    pairs = torch.arange(27) + 10
    kept = int(pairs.sum() - pairs[4])
    assert _engine.bf16_cost(w.bfloat16(), pairs) == (2 * kept * (2 * 16 + 1 * 8), "vector")
    assert F.engine_cost(w.bfloat16(), pairs) == (2 * kept * (2 * 16 + 1 * 8), "vector")
    full = torch.randn(27, 7, 24).bfloat16()
    assert F.engine_cost(full, pairs) == (2 * int(pairs.sum()) * 7 * 24, "dense")
    full[4] = 0
    assert F.engine_cost(full, pairs) == (2 * kept * 7 * 24, "offsets")
    # the decision agrees with the kernel's own
    x = _cloud(c=7, seed=2)
    plan = _engine.make_fused_plan(ps.kmap.get_kmap(x, 3))
    for weight in (w.bfloat16(), full):
        ran = _forward_bf16(plan, x.feats.bfloat16(), weight, None, 24, 1, False,
                            _engine.bf16_vector_threshold(24))[0]
        assert ran == _engine.bf16_cost(weight, pairs)[1]


def test_report_under_bf16_autocast_costs_the_bf16_kernels_it_ran():
    """A float32 conv under torch.autocast(bfloat16) runs the bf16 kernels on
    its weight rounded to bf16; sparsity_report run under autocast costed
    it as the float32 kernels (their 16-column vectors, one channel each:
    2 * pairs * (16 + 8) here, where the bf16 kernels' channel pairs run 2 *
    pairs * (2 * 16 + 8)). Now its executed FLOPs are the bf16 model's."""
    from pointsparse import prune

    conv = spnn.Conv3d(7, 24, 3)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, :16] = 1.0
        conv.weight[:, 6, 16:] = 1.0
        conv.weight[4] = 0
    x = _cloud(c=7, seed=2)
    pairs = ps.kmap.get_kmap(x, 3).sizes.to(torch.int64)
    kept = int(pairs.sum() - pairs[4])
    assert prune.sparsity_report(conv, x)["layers"][""]["executed_flops"] == 2 * kept * (16 + 8)  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).feats.dtype == torch.bfloat16  # (the bf16 kernels ran it)
        row = prune.sparsity_report(conv, x)["layers"][""]
    assert (row["executed_flops"], row["execution"]) == (2 * kept * (2 * 16 + 8), "vector")
    converted = prune.sparsity_report(conv.bfloat16(), ps.SparseTensor(x.feats.bfloat16(), x.coords))
    assert converted["layers"][""]["executed_flops"] == row["executed_flops"]


def test_forward_bf16_adds_a_bf16_residual_before_the_relu():
    """add: a bf16 residual widened and added in float32 before the ReLU,
    block by block: equal bit for bit to the same float32 ops after the
    kernel, in both forms; the rounded output is its one rounding. Through
    F.conv3d(add=) a bf16 residual block's sum runs in the store too."""
    x = _cloud(c=24, seed=9)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    g = torch.Generator().manual_seed(9)
    wb = _vector_pruned(27, 24, 40, 0.3, g).bfloat16()
    fb, bias = x.feats.bfloat16(), torch.randn(40, generator=g)
    residual = torch.randn(kmap.num_out, 40, generator=g).bfloat16()
    plain = _forward_bf16(plan, fb, wb, bias, 40, 2, False, -1.0)[1]
    want = torch.relu(plain + residual.float())
    for density in (-1.0, 1.0):
        out = torch.full((kmap.num_out, 40), float("nan"))
        rounded = torch.empty(kmap.num_out, 40, dtype=torch.bfloat16)
        plan.core.forward_bf16(fb.view(torch.int16).numpy(), wb.view(torch.int16).numpy(), bias.numpy(),
                               out.numpy(), 2, True, out_bf16=rounded.view(torch.int16).numpy(),
                               vector_density=density, add=residual.view(torch.int16).numpy())
        assert torch.equal(out, want) and torch.equal(rounded, want.to(torch.bfloat16))
    bits = fb.view(torch.int16).numpy()
    out = torch.empty(kmap.num_out, 40)
    for bad, match in ((residual.float().numpy(), "add must hold bf16 bits"),
                       (torch.zeros(3, 40, dtype=torch.int16).numpy(), "add"),
                       (out.view(torch.int16).view(-1)[:kmap.num_out * 40].view(kmap.num_out, 40).numpy(),
                        "add must not share memory with out")):
        with pytest.raises(ValueError, match=match):
            plan.core.forward_bf16(bits, wb.view(torch.int16).numpy(), None, out.numpy(), 1, add=bad)
    with torch.no_grad():
        y = F.conv3d(x.with_feats(fb), wb, 3, bias=bias.bfloat16(), relu=True,
                     add=ps.SparseTensor(residual, x.coords))
    exact = torch.relu(conv_sum(fb.double(), wb.double(), kmap) + bias.bfloat16().double() + residual.double())
    assert y.feats.dtype == torch.bfloat16 and _rel(y.feats, exact) < 2 ** -8


@pytest.mark.skipif(_ext.core.conv_amx(), reason="the CPU runs the AMX tiles (tests/test_bf16_tiles.py)")
def test_forward_bf16_ignores_tiles_width_without_amx(monkeypatch):
    """Where the CPU (or OS) runs no AMX-BF16 tiles, tiles_width changes
    nothing: the vdpbf16ps form runs, the same bits; the engine (tiles
    allowed) never passes a finite width and costs no conv as tiles."""
    monkeypatch.setattr(_engine, "BF16_TILES", True)
    x = _cloud(c=32, seed=12)
    plan = _engine.make_fused_plan(ps.kmap.get_kmap(x, 3))
    fb = x.feats.bfloat16()
    wb = (torch.randn(27, 32, 32, generator=torch.Generator().manual_seed(12)) / 6).bfloat16()
    outs = []
    for width in (float("inf"), 0.0):
        out = torch.empty(len(x), 32)
        assert plan.core.forward_bf16(fb.view(torch.int16).numpy(), wb.view(torch.int16).numpy(), None, out.numpy(),
                                      1, tiles_width=width) == "dense"
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert not _engine.bf16_tiles() and _engine.bf16_tiles_width() == float("inf")
    assert F.engine_cost(wb, torch.arange(27) + 10)[1] == "dense"


class _Recorder:
    """A plan's ``core`` that records which forward ran: ``("bf16", what
    forward_bf16 says ran)`` or ``("float32", offsets run)``."""

    def __init__(self, core, runs):
        self._core, self._runs = core, runs

    def __getattr__(self, name):
        return getattr(self._core, name)

    def forward_bf16(self, *args, **kwargs):
        ran = self._core.forward_bf16(*args, **kwargs)
        self._runs.append(("bf16", ran))
        return ran

    def forward(self, feats, *args, active=None, **kwargs):
        self._runs.append((str(feats.dtype), 27 if active is None else int(active.sum())))
        return self._core.forward(feats, *args, active=active, **kwargs)


@pytest.mark.parametrize("kind", ["dense", "cross", "offsets listed", "offsets pruned", "pair vectors pruned"])
def test_a_bf16_conv_runs_the_bf16_kernels_unless_it_has_a_region_or_a_gradient(monkeypatch, kind):
    """Which kernels a bf16 ``Conv3d`` runs on a CPU with AVX512-BF16, as
    ``functional._eager_path`` says: in inference (no gradient wanted: under
    no_grad, or a weight that requires none) the bf16 kernels, offsets
    pruned whole skipped and a weight pruned in bf16 vectors
    (``panel_structured(..., rows=2)``) in their vector form; a conv with a
    ``kernel_region`` the float32 kernels on the widened values over the
    region's offsets ("bf16 on float32"), in inference too; a gradient
    wanted, the float32 kernels. Each within one bf16 rounding of the exact
    conv of the bf16 weights (the float32 path equal to the float32 engine
    on them, rounded once); engine_cost costs the kernels that ran."""
    from pointsparse import prune

    runs = []
    real = _engine.get_plan

    def recorded(kmap, cache=None):
        plan = real(kmap, cache)
        return _engine.FusedPlan(_Recorder(plan.core, runs), plan.identity, plan.num_in, plan.num_out)

    monkeypatch.setattr(_engine, "get_plan", recorded)
    region = {"cross": "cross", "offsets listed": [0, 4, 13, 22, 26]}.get(kind)
    x = _cloud(3000, 16, seed=1, extent=16)
    xb = x.with_feats(x.feats.bfloat16())
    kmap = ps.kmap.get_kmap(x, 3)
    for no_grad, requires_grad in ((True, True), (True, False), (False, False), (False, True)):
        torch.manual_seed(0)
        conv = spnn.Conv3d(16, 32, 3, bias=True, kernel_region=region)
        if kind == "offsets pruned":
            prune.kernel_structured(conv, "weight", 0.6, scope="offset")  # the mask kept: weight_mask given
        elif kind == "pair vectors pruned":
            prune.panel_structured(conv, "weight", 0.75, rows=2)
        conv = conv.to(torch.bfloat16).requires_grad_(requires_grad)
        runs.clear()
        with torch.set_grad_enabled(not no_grad):
            y = conv(xb).feats
            path = F._conv_path(xb.feats, conv.weight, conv.bias, 3, region)
        w, b = conv.weight.detach(), conv.bias.detach()
        _, keep, _ = _engine.bf16_vectors(w)
        if region is not None:
            keep &= F.region_of(3, region)
        inference = no_grad or not requires_grad
        if region is None and inference:
            ran = {"dense": "dense", "offsets pruned": "offsets", "pair vectors pruned": "vector"}[kind]
            assert (path, runs) == ("bf16", [("bf16", ran)]), (no_grad, requires_grad)
            assert F.engine_cost(w, kmap.sizes, 3)[1] == ran
        else:
            assert path == "bf16 on float32" and runs == [("float32", int(keep.sum()))], (no_grad, requires_grad)
            wide = F.conv3d(x.with_feats(xb.feats.float()), w.float(), 3, bias=b.float(), kernel_region=region).feats
            assert torch.equal(y.detach(), wide.detach().to(torch.bfloat16))
        if region is not None and inference:
            assert F.engine_cost(w, kmap.sizes, 3, region)[1] == "offsets"  # the float32 kernels' choice
        assert y.dtype == torch.bfloat16 and y.requires_grad == (not no_grad and requires_grad)
        exact = conv_sum(xb.feats.double(), w.double() * keep.double().view(-1, 1, 1), kmap) + b.double()
        assert _rel(y.detach(), exact) < 2 ** -8  # one bf16 rounding of a float32 sum
