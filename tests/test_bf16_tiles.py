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


@pytest.mark.parametrize("c_in,c_out", [(1, 5), (2, 16), (7, 17), (8, 8), (24, 24), (31, 33), (33, 64), (64, 64),
                                        (100, 100), (64, 160)])
def test_tiles_against_the_exact_sum_for_any_thread_count(c_in, c_out):
    """One or several channel chunks (c_in up to 32, or more: 16 pairs a
    chunk, the last padded), one to four sums tiles a pass or more (c_out
    past 64), odd channels and columns: within float32 rounding of the exact
    sum, equal for 1, 2 and 3 threads, the ReLU the ReLU of the sums."""
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
