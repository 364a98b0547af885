"""The bf16 inference forward on the AMX tiles (``forward_bf16(tiles_width=)``,
Intel Xeon with AMX-BF16): per tile of 16 pairs the gathered rows' channel
pairs times the offset's weight, summed from zero in float32, then added to
the row. Accuracy: within float32 rounding of the exact conv of the
bf16-rounded inputs; the same bits for any thread count; the epilogue
(bias, residual, ReLU, bf16 rounding) as the ``vdpbf16ps`` forms'."""

from __future__ import annotations

import math

import pytest
import torch

import pointsparse as ps
from pointsparse import _ext
from pointsparse.nn import _engine
from pointsparse.nn import functional as F
from reference import conv_sum, random_cloud as _cloud, rel_error as _rel

pytestmark = pytest.mark.skipif(not _ext.core.conv_amx(), reason="the CPU (or OS) runs no AMX-BF16 tiles")

ALWAYS = 0.0  # tiles_width: the tiles wherever they run


def _bits(t):
    return t.contiguous().view(torch.int16).numpy()


def _run(plan, fb, wb, bias, c_out, nt, relu=False, width=ALWAYS, add=None):
    """``(what ran, float32 out, rounded out)``; the same call without the
    float32 out (its sums kept block by block) must round to the same bits."""
    out = torch.full((plan.num_out, c_out), float("nan"))
    rounded = torch.empty(plan.num_out, c_out, dtype=torch.bfloat16)
    blocks = torch.empty(plan.num_out, c_out, dtype=torch.bfloat16)
    args = (_bits(fb), _bits(wb), None if bias is None else bias.numpy())
    kwargs = dict(tiles_width=width, add=None if add is None else _bits(add))
    ran = plan.core.forward_bf16(*args, out.numpy(), nt, relu, out_bf16=_bits(rounded), **kwargs)
    assert plan.core.forward_bf16(*args, None, nt, relu, out_bf16=_bits(blocks), **kwargs) == ran
    assert torch.equal(blocks.view(torch.int16), rounded.view(torch.int16))
    return ran, out, rounded


@pytest.mark.parametrize("c_in,c_out", [(1, 5), (2, 16), (7, 17), (8, 8), (24, 24), (31, 33), (32, 32), (33, 64),
                                        (64, 64), (70, 40), (64, 72), (100, 100), (64, 160)])
def test_tiles_against_the_exact_sum_for_any_thread_count(c_in, c_out):
    """One or several channel chunks (c_in up to 32, or more: chunks of up
    to 16 pairs, as even as they come, the last pairs padded), one to four
    sums tiles a pass or more (c_out past 64: a last pass of one), odd
    channels and columns: within float32 rounding of the exact sum, equal
    for 1, 2 and 3 threads, the ReLU the ReLU of the sums."""
    x = _cloud(c=c_in, seed=c_in + c_out)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    g = torch.Generator().manual_seed(c_in * 100 + c_out)
    fb = x.feats.bfloat16()
    wb = (torch.randn(27, c_in, c_out, generator=g) / c_in ** 0.5).bfloat16()
    bias = torch.randn(c_out, generator=g)
    runs = {}
    for nt, relu in ((1, False), (2, False), (3, False), (2, True)):
        ran, out, rounded = _run(plan, fb, wb, bias, c_out, nt, relu)
        assert ran == "tiles"
        assert torch.equal(rounded, out.to(torch.bfloat16))
        runs[(nt, relu)] = out
    assert torch.equal(runs[(1, False)], runs[(2, False)]) and torch.equal(runs[(1, False)], runs[(3, False)])
    assert torch.equal(runs[(2, True)], torch.relu(runs[(2, False)]))
    exact = conv_sum(fb.double(), wb.double(), kmap) + bias.double()
    assert _rel(runs[(1, False)], exact) < 1e-6


def test_tiles_over_many_blocks_skipped_offsets_and_maps_without_identity():
    """Many blocks a thread (the pipeline emptied at each block's end),
    offsets whose weight is zero skipped (the identity among them), a k2 s2
    map (no identity offset: rows start as the bias), no bias; a residual
    added before the ReLU as the vdpbf16ps forms add it (the same float32
    ops after the sums)."""
    x = _cloud(n=9000, c=24, seed=4, extent=30)
    assert len(x) > 12 * 512
    g = torch.Generator().manual_seed(4)
    fb = x.feats.bfloat16()
    for kmap, bias in ((ps.kmap.get_kmap(x, 3), torch.randn(40, generator=g)),
                       (ps.kmap.get_kmap(x, 2, stride=2), None)):
        plan = _engine.make_fused_plan(kmap)
        K = kmap.kernel_volume
        w = torch.randn(K, 24, 40, generator=g) / 5
        zero = [1, 5] + ([_engine.identity_offset(kmap)] if K == 27 else [])
        w[zero] = 0
        wb = w.bfloat16()
        exact = conv_sum(fb.double(), wb.double(), kmap) + (0 if bias is None else bias.double())
        residual = torch.randn(kmap.num_out, 40, generator=g).bfloat16()
        outs = []
        for nt in (1, 2, 3):
            ran, plain, _ = _run(plan, fb, wb, bias, 40, nt)
            assert ran == "tiles"
            assert _rel(plain, exact) < 1e-6
            ran, out, rounded = _run(plan, fb, wb, bias, 40, nt, True, add=residual)
            want = torch.relu(plain + residual.float())
            assert torch.equal(out, want) and torch.equal(rounded, want.to(torch.bfloat16))
            outs.append(out)
        assert all(torch.equal(outs[0], o) for o in outs)


def test_tiles_width_decides_where_the_tiles_run():
    """The tiles run where density x sqrt(C_in x C_out) (density: listed bf16
    vectors over the kept offsets' capacity, as for vector_density) is at
    least tiles_width; infinite (the default): never; NaN: ValueError; a
    weight with no nonzero never runs them."""
    x = _cloud(c=32, seed=11)
    plan = _engine.make_fused_plan(ps.kmap.get_kmap(x, 3))
    fb = x.feats.bfloat16()
    w = torch.zeros(27, 32, 32)
    w[:, :8, :16] = 1.0  # 4 of 16 pairs in panel 0, none in panel 1: density 4 / 32
    wb = w.bfloat16()
    width = 4 / 32 * math.sqrt(32 * 32)  # 4.0
    assert _engine.bf16_vectors(wb)[2] == 4 / 32
    assert _run(plan, fb, wb, None, 32, 1, width=width)[0] == "tiles"
    assert _run(plan, fb, wb, None, 32, 1, width=math.nextafter(width, math.inf))[0] == "dense"
    out = torch.empty(len(x), 32)
    assert plan.core.forward_bf16(_bits(fb), _bits(wb), None, out.numpy(), 1) == "dense"
    assert plan.core.forward_bf16(_bits(fb), _bits(torch.zeros(27, 32, 32).bfloat16()), None, out.numpy(), 1,
                                  tiles_width=ALWAYS) == "offsets"
    assert not out.isnan().any() and not out.any()  # bias or zero in every row
    with pytest.raises(ValueError, match="tiles_width must be a number"):
        plan.core.forward_bf16(_bits(fb), _bits(wb), None, out.numpy(), 1, tiles_width=float("nan"))


def test_the_engine_runs_and_costs_the_tiles_by_the_listed_width(monkeypatch):
    """F.conv3d in bf16 inference: a dense 32 x 32 conv (listed width 32)
    runs on the tiles (within a bf16 rounding of the exact sum), a
    vector-pruned one below BF16_TILES_WIDTH does not; engine_cost says the
    same as the kernel; BF16_TILES = False turns the tiles off."""
    x = _cloud(c=32, seed=3)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    g = torch.Generator().manual_seed(3)
    dense = (torch.randn(27, 32, 32, generator=g) / 6).bfloat16()
    sparse = dense.clone()
    sparse[:, 4:, :] = 0  # 2 of 16 pairs listed: width 4
    pairs = torch.arange(27) + 10
    assert _engine.bf16_tiles() and _engine.bf16_tiles_width() == _engine.BF16_TILES_WIDTH
    for weight, want in ((dense, "tiles"), (sparse, "vector")):
        cost = F.engine_cost(weight, pairs)
        assert cost[1] == want
        assert plan.core.forward_bf16(_bits(x.feats.bfloat16()), _bits(weight), None, torch.empty(len(x), 32).numpy(),
                                      1, vector_density=_engine.bf16_vector_threshold(32),
                                      tiles_width=_engine.bf16_tiles_width()) == want
        with torch.no_grad():
            y = F.conv3d(x.with_feats(x.feats.bfloat16()), weight, 3)
        exact = conv_sum(x.feats.bfloat16().double(), weight.double(), kmap)
        assert y.feats.dtype == torch.bfloat16 and _rel(y.feats, exact) < 2 ** -8
    assert F.engine_cost(dense, pairs) == (2 * int(pairs.sum()) * 32 * 32, "tiles")
    monkeypatch.setattr(_engine, "BF16_TILES", False)
    assert _engine.bf16_tiles_width() == math.inf and F.engine_cost(dense, pairs)[1] == "dense"


def _offset_sums(plan, fb, w, k, c_out):
    """Offset k's tile sums alone: its weight only, no bias (rows without a
    pair stay zero; a row's sums do not depend on the other rows of its
    tile)."""
    alone = torch.zeros_like(w)
    alone[k] = w[k]
    return _run(plan, fb, alone, None, c_out, 1)[1]


def test_tiles_add_each_offsets_sums_in_the_walks_order():
    """Bit for bit: the identity's tile sums stored over the bias, then each
    other kept offset's sums added to its rows in offset order (the order
    the pipeline must keep although it adds a tile two tiles later), for 1
    and 2 threads over many blocks."""
    x = _cloud(n=4000, c=20, seed=21, extent=24)
    assert len(x) > 4 * 512
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    g = torch.Generator().manual_seed(21)
    fb = x.feats.bfloat16()
    w = (torch.randn(27, 20, 24, generator=g) / 4).bfloat16()
    w[6] = 0  # an offset left out
    bias = torch.randn(24, generator=g)
    identity = _engine.identity_offset(kmap)
    want = bias + _offset_sums(plan, fb, w, identity, 24)
    for k in range(27):
        if k in (identity, 6):
            continue
        rows = kmap.pairs(k)[1].long()
        want[rows] = want[rows] + _offset_sums(plan, fb, w, k, 24)[rows]
    for nt in (1, 2):
        assert torch.equal(_run(plan, fb, w, bias, 24, nt)[1], want)


def test_tiles_on_one_block_and_more_threads_than_blocks():
    """An output of fewer rows than a block (the walk not parallel, a block
    of sums that short) with 1 and 3 threads: the exact sum, the same bits."""
    x = _cloud(n=300, c=24, seed=5, extent=9)
    assert len(x) < 512
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    g = torch.Generator().manual_seed(5)
    fb, wb = x.feats.bfloat16(), (torch.randn(27, 24, 40, generator=g) / 5).bfloat16()
    bias = torch.randn(40, generator=g)
    outs = [_run(plan, fb, wb, bias, 40, nt, True)[1] for nt in (1, 3)]
    assert torch.equal(outs[0], outs[1])
    exact = torch.relu(conv_sum(fb.double(), wb.double(), kmap) + bias.double())
    assert _rel(outs[0], exact) < 1e-6


def test_tiles_after_other_tile_users_and_from_several_threads():
    """Each call loads its own tile configuration: calls of other shapes
    (another chunk width) and torch's own bf16 matmuls between them change
    nothing; calls from several Python threads at once give the bits of a
    call alone."""
    import threading

    x = _cloud(c=64, seed=8)
    plan = _engine.make_fused_plan(ps.kmap.get_kmap(x, 3))
    g = torch.Generator().manual_seed(8)
    cases = []
    for c_in, c_out in ((8, 16), (64, 40), (40, 24)):
        fb = x.feats[:, :c_in].bfloat16()
        wb = (torch.randn(27, c_in, c_out, generator=g) / 4).bfloat16()
        cases.append((fb, wb, c_out, _run(plan, fb, wb, None, c_out, 2)[1]))
    a = torch.randn(512, 512, generator=g).bfloat16()
    for fb, wb, c_out, want in cases + cases[::-1]:
        _ = a @ a  # torch's kernels (oneDNN, AMX where it has it) between calls
        assert torch.equal(_run(plan, fb, wb, None, c_out, 2)[1], want)
    got = {}

    def call(i):
        fb, wb, c_out, _ = cases[i % 3]
        got[i] = _run(plan, fb, wb, None, c_out, 2)[1]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[i], cases[i % 3][3]) for i in range(6))


def test_minkunet_bf16_on_the_tiles(monkeypatch):
    """A fused MinkUNet (cr = 0.5: 16 to 128 channels) in bf16 with the
    engine's choice of forms: some convs on the tiles (the listed width at
    least BF16_TILES_WIDTH), within the bf16 accuracy of its float32 eval
    output, and within float32 rounding effects of its run without the
    tiles."""
    from pointsparse import nn as spnn
    from pointsparse.models import MinkUNet

    torch.manual_seed(0)
    net = MinkUNet(4, 6, cr=0.5).eval()
    x = _cloud(4000, 4, extent=40)
    fused = spnn.fuse_for_inference(net).to(torch.bfloat16)
    widths = [m.weight.shape for m in fused.modules() if isinstance(m, spnn.Conv3d)]
    assert any(math.sqrt(c_in * c_out) >= _engine.BF16_TILES_WIDTH for _, c_in, c_out in widths)
    xb = ps.SparseTensor(x.feats.bfloat16(), x.coords)
    ran = []
    real = _engine.bf16_forward

    def spy(feats, weight, *args, **kwargs):
        ran.append(_engine.bf16_cost(weight, [1] * weight.shape[0])[1])
        return real(feats, weight, *args, **kwargs)

    with torch.no_grad():
        ref = net(x).feats
        monkeypatch.setattr(_engine, "bf16_forward", spy)
        out = fused(xb).feats
        monkeypatch.setattr(_engine, "BF16_TILES", False)
        plain = fused(xb).feats
    assert "tiles" in ran and out.dtype == torch.bfloat16
    assert _rel(out, ref) < 5e-2
    assert (out.float().argmax(1) == ref.argmax(1)).float().mean() > 0.9
    assert _rel(out, plain) < 2e-2
