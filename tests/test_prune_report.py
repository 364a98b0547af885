"""Sparsity and cost report: counts and FLOPs against hand computations."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import pointsparse.prune as prune
from pointsparse import SparseTensor
from prune_support import SparseConv, naive_pair_counts, set_weight, sparse_input


def two_sites() -> SparseTensor:
    """Sites (0,0,0) and (0,0,1): with kernel 1x1x3 the offsets z=-1, 0, +1 have 1, 2, 1 pairs."""
    coords = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.int32)
    return SparseTensor(torch.ones(2, 2), coords)


class _Head(nn.Module):
    """A sparse conv, then a per-site Linear on its feats (``body[0]``, ``body[1]``)."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, t):
        return self.body[1](self.body[0](t).feats)


def test_dense_layers_counts_and_flops():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 25, 4))
    prune.custom_from_mask(model[0], "weight", (torch.arange(54).reshape(3, 2, 3, 3) % 3 != 0).float())
    report = prune.sparsity_report(model, torch.randn(2, 2, 5, 5))
    conv, fc = report["layers"]["0"], report["layers"]["2"]
    assert conv["type"] == "Conv2d" and conv["shape"] == (3, 2, 3, 3)
    assert conv["params"] == 54 + 3 and conv["weight_nonzeros"] == 36
    assert conv["sparsity"] == pytest.approx(1 / 3)
    assert conv["flops"] == 2 * (2 * 5 * 5) * 36 and conv["dense_flops"] == 2 * 50 * 54  # N * H * W positions
    assert fc["flops"] == 2 * 2 * 300 and fc["params"] == 304  # 2 rows
    total = report["total"]
    assert total["params"] == 57 + 304 and total["flops"] == conv["flops"] + fc["flops"]
    assert total["sparsity"] == pytest.approx(18 / (54 + 300))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_a_linear_without_input_features_costs_nothing():
    """A Linear(0, out) (every input channel cut) runs as torch's (its bias
    for each row); its report row was a ZeroDivisionError (rows counted as
    input numel // in_features), compressed too."""
    from pointsparse import formats

    lin = nn.Linear(0, 3)
    x = torch.ones(2, 5, 0)
    for model in (nn.Sequential(lin), formats.compress(nn.Sequential(lin), "csr")):
        row = prune.sparsity_report(model, x)["layers"]["0"]
        assert (row["flops"], row["dense_flops"], row["executed_flops"]) == (0, 0, 0)
        assert row["params"] == 3 and row["sparsity"] == 0.0


def test_transposed_conv_counts_input_positions():
    model = nn.ConvTranspose2d(2, 3, 2, stride=2)
    report = prune.sparsity_report(model, torch.randn(1, 2, 4, 4))
    assert report["layers"][""]["flops"] == 2 * 16 * model.weight.numel()


def test_sparse_conv_flops_from_pair_counts():
    conv = SparseConv(2, 2, kernel_size=(1, 1, 3))
    weights = torch.zeros(3, 2, 2)
    weights[0] = 1.0  # 4 nonzeros at offset z=-1
    weights[1, 0, 0] = 1.0  # 1 nonzero at offset 0; offset +1 all zero
    set_weight(conv, weights)
    x = two_sites()
    counts = naive_pair_counts(x.coords, (1, 1, 3))
    assert counts.tolist() == [1, 2, 1]
    report = prune.sparsity_report(conv, x, pairs={"": counts})
    row = report["layers"][""]
    assert row["flops"] == 2 * (1 * 4 + 2 * 1 + 1 * 0) and row["dense_flops"] == 2 * 4 * 4
    # without running the model the counts alone give the same FLOPs
    assert prune.sparsity_report(conv, pairs={"": counts})["layers"][""]["flops"] == 12


def test_sparse_conv_pair_counts_from_the_kernel_map():
    conv = SparseConv(4, 3, kernel_size=3)
    prune.l1_unstructured(conv, "weight", amount=0.6)
    x = sparse_input(n=12, channels=4)
    from_kmap = prune.sparsity_report(conv, x)["layers"][""]
    by_hand = prune.sparsity_report(conv, x, pairs={"": naive_pair_counts(x.coords)})["layers"][""]
    per_offset = (conv.weight != 0).sum(dim=(1, 2))
    assert from_kmap["flops"] == 2 * int((naive_pair_counts(x.coords) * per_offset).sum())
    assert from_kmap["flops"] == by_hand["flops"] and from_kmap["dense_flops"] == by_hand["dense_flops"]


def test_strided_and_transposed_sparse_convs():
    # kernel 2 stride 2: every input site meets exactly one output, so sum_o pairs(o) = N
    down = SparseConv(2, 3, kernel_size=2, stride=2)
    up = SparseConv(3, 2, kernel_size=2, stride=2, transposed=True)
    prune.kernel_structured(down, "weight", amount=4, scope="offset")  # 4 of 8 offsets gone
    model = nn.Sequential(down, up)
    x = sparse_input(n=14, channels=2, extent=4)
    report = prune.sparsity_report(model, x)["layers"]
    assert report["0"]["dense_flops"] == 2 * 14 * 2 * 3 and report["1"]["dense_flops"] == 2 * 14 * 3 * 2
    kept_pairs = naive_pairs_strided(x.coords, kept=down.weight_mask.sum((1, 2)) > 0)
    assert report["0"]["flops"] == 2 * kept_pairs * 6
    assert report["1"]["flops"] == report["1"]["dense_flops"]


def naive_pairs_strided(coords: torch.Tensor, kept: torch.Tensor) -> int:
    """Pairs of kernel-2 stride-2 offsets marked ``kept``: site c meets offset
    ``(c_x % 2, c_y % 2, c_z % 2)`` (index ``(i_x * 2 + i_y) * 2 + i_z``)."""
    parity = coords[:, 1:].remainder(2).long()
    index = (parity[:, 0] * 2 + parity[:, 1]) * 2 + parity[:, 2]
    return int(kept[index].sum())


def test_before_and_after_table():
    torch.manual_seed(0)
    model = nn.Sequential(SparseConv(4, 8, kernel_size=3), nn.Linear(8, 2))
    x = sparse_input(n=12, channels=4)
    pairs = {"body.0": naive_pair_counts(x.coords)}

    net = _Head(model)
    before = prune.sparsity_report(net, x, pairs=pairs)
    prune.channel_structured(model[0], "weight", amount=0.5)
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    after = prune.sparsity_report(net, x, pairs=pairs)
    assert after["layers"]["body.0"]["flops"] == before["layers"]["body.0"]["flops"] // 2
    assert after["layers"]["body.1"]["weight_nonzeros"] == 8
    assert after["total"]["flops"] < before["total"]["flops"]
    table = prune.format_report(after, before)
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "type", "shape", "params", "nonzeros", "sparsity", "FLOPs", "executed"]
    assert any(line.startswith("body.0") and "0.0% -> 50.0%" in line for line in lines)
    assert lines[-1].startswith("total")


def test_format_report_shows_a_channel_cut_in_shape_and_params():
    """A cut (narrower layers under the same names) shows as ``before ->
    now`` in the shape and params columns too: params were shown as they
    are now only, and a cut's saving appeared only among the nonzeros; an
    unchanged layer keeps its one value."""
    x = sparse_input(n=12, channels=4)
    pairs = {"body.0": naive_pair_counts(x.coords)}
    torch.manual_seed(0)
    net = _Head(nn.Sequential(SparseConv(4, 8, kernel_size=3), nn.Linear(8, 2)))
    before = prune.sparsity_report(net, x, pairs=pairs)
    net.body[0] = SparseConv(4, 4, kernel_size=3)  # (as a cut leaves them: half the conv's filters)
    net.body[1] = nn.Linear(4, 2)
    after = prune.sparsity_report(net, x, pairs=pairs)
    lines = {line.split()[0]: line for line in prune.format_report(after, before).splitlines()[2:]}
    conv = before["layers"]["body.0"]
    assert "x".join(map(str, conv["shape"])) + " -> " + "x".join(map(str, after["layers"]["body.0"]["shape"])) \
        in lines["body.0"]
    assert f"{conv['params']} -> {after['layers']['body.0']['params']}" in lines["body.0"]
    assert f"{before['total']['params']} -> {after['total']['params']}" in lines["total"]
    same = prune.format_report(before, before)
    assert " -> " not in same.splitlines()[2].split("  ")[2]  # (an unchanged shape: one value)


def test_report_leaves_training_state_alone_and_without_input_has_no_flops():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    stats = model[1].running_mean.clone()
    report = prune.sparsity_report(model, torch.randn(4, 3))
    assert model.training and torch.equal(model[1].running_mean, stats)
    assert report["layers"]["0"]["flops"] == 2 * 4 * 9
    bare = prune.sparsity_report(model)
    assert bare["layers"]["0"]["flops"] is None and bare["total"]["flops"] is None
    assert "-" in prune.format_report(bare)


def test_format_report_takes_sparsity_reports():
    report = prune.sparsity_report(nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"report must be what sparsity_report returns.*keys \['a'\]"):
        prune.format_report({"a": 1})
    with pytest.raises(TypeError, match="report must be what sparsity_report returns.*got list"):
        prune.format_report([report])
    with pytest.raises(TypeError, match="before must be what sparsity_report returns.*got str"):
        prune.format_report(report, before="report")
    broken = {"layers": {"fc": {"type": "Linear"}}, "total": report["total"]}
    with pytest.raises(TypeError, match=r"before must be .*its row 'fc' lacks \['shape', 'params'"):
        prune.format_report(report, before=broken)
    with pytest.raises(TypeError, match="its row 'total' lacks"):
        prune.format_report({"layers": {}, "total": {"type": "total"}})


def test_report_of_meta_weights_is_a_value_error():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), SparseConv(3, 2, kernel_size=3)).to("meta")
    with pytest.raises(ValueError, match="layer '0' has its weight on the meta device.*must hold values"):
        prune.sparsity_report(model)
    model = nn.Sequential(nn.Linear(4, 3), SparseConv(3, 2, kernel_size=3))
    model[1].to("meta")
    with pytest.raises(ValueError, match="layer '1' has its weight on the meta device"):
        prune.sparsity_report(model)
    layer = nn.Linear(4, 4)
    layer.bias = nn.Parameter(torch.empty(4, device="meta"))
    with pytest.raises(ValueError, match="layer '\\(model\\)' has its bias on the meta device"):
        prune.sparsity_report(layer)


def test_print_report(capsys):
    model = nn.Linear(4, 4)
    prune.print_report(model, torch.randn(1, 4))
    assert "Linear" in capsys.readouterr().out


def test_report_bad_pairs():
    conv = SparseConv(2, 2, kernel_size=(1, 1, 3))
    with pytest.raises(ValueError, match=r"must have shape \(3,\)"):
        prune.sparsity_report(conv, two_sites(), pairs={"": [1, 2]})
    with pytest.raises(ValueError, match="not a sparse conv"):
        prune.sparsity_report(conv, pairs={"missing": [1, 2, 1]})
    with pytest.raises(ValueError, match="1-D integer"):
        prune.sparsity_report(conv, pairs={"": [1.0, 2.0, 1.0]})


@pytest.mark.parametrize("with_input", [False, True])
def test_report_bad_pairs_checked_with_or_without_an_example_input(with_input):
    conv = SparseConv(2, 2, kernel_size=(1, 1, 3))
    x = two_sites() if with_input else None
    with pytest.raises(ValueError, match=r"pairs names 'missing', which is not a sparse conv"):
        prune.sparsity_report(conv, x, pairs={"missing": [1, 2, 1]})
    with pytest.raises(ValueError, match="1-D integer"):
        prune.sparsity_report(conv, x, pairs={"": [1.0, 2.0, 1.0]})
    with pytest.raises(ValueError, match="1-D integer"):
        prune.sparsity_report(conv, x, pairs={"": [[1, 2, 1]]})
    with pytest.raises(ValueError, match="1-D integer"):
        prune.sparsity_report(conv, x, pairs={"": [True, False, True]})
    with pytest.raises(ValueError, match=r"pair counts must be >= 0; got \[1, -2, 1\]"):
        prune.sparsity_report(conv, x, pairs={"": [1, -2, 1]})
    with pytest.raises(TypeError, match="pair counts must be a 1-D integer sequence; got str"):  # (torch's new())
        prune.sparsity_report(conv, x, pairs={"": "x"})
    with pytest.raises(ValueError, match=r"must have shape \(3,\); got \(2,\)"):
        prune.sparsity_report(conv, x, pairs={"": [1, 2]})
    with pytest.raises(TypeError, match="pairs must be a dict"):
        prune.sparsity_report(conv, x, pairs=[1, 2, 1])
    dense = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"pairs names '', which is not a sparse conv"):
        prune.sparsity_report(dense, torch.randn(1, 4) if with_input else None, pairs={"": [1, 2, 1]})
    # a good override gives the same FLOPs either way
    counts = torch.tensor([1, 2, 1])
    assert prune.sparsity_report(conv, x, pairs={"": counts})["layers"][""]["flops"] == \
        prune.sparsity_report(conv, pairs={"": counts.tolist()})["layers"][""]["flops"]


def test_executed_flops_follow_the_engine_choice(monkeypatch):
    """Executed FLOPs: dense for unstructured sparsity, the kept offsets'
    pairs for offset pruning, the listed vectors' columns for vector pruning
    (against hand counts from the pair counts); torch layers run dense. The
    vector threshold pinned to the Zen's (it depends on the CPU)."""
    import pointsparse as ps
    from pointsparse.nn import _engine

    monkeypatch.setattr(_engine, "VECTOR_DENSITY", _engine.VECTOR_DENSITY_SPLIT)

    counts = torch.arange(1, 28, dtype=torch.int64)
    torch.manual_seed(0)
    conv = ps.nn.Conv3d(8, 40, 3)
    row = prune.sparsity_report(conv, pairs={"": counts})["layers"][""]
    assert row["execution"] == "dense" and row["executed_flops"] == row["dense_flops"] == 2 * 378 * 320
    prune.l1_unstructured(conv, "weight", amount=0.5)
    row = prune.sparsity_report(conv, pairs={"": counts})["layers"][""]
    assert row["execution"] == "dense" and row["executed_flops"] == row["dense_flops"] > row["flops"]
    prune.remove(conv, "weight")
    with torch.no_grad():
        conv.weight.normal_()
        conv.weight[:10] = 0
    row = prune.sparsity_report(conv, pairs={"": counts})["layers"][""]
    assert row["execution"] == "offsets" and row["executed_flops"] == row["flops"] == 2 * int(counts[10:].sum()) * 320
    prune.panel_structured(conv, "weight", 0.85)  # density under vector_threshold(8)
    row = prune.sparsity_report(conv, pairs={"": counts})["layers"][""]
    blocks = _engine.vector_blocks(conv.weight)  # panels of 16, 16 and 8 columns
    columns = (blocks * torch.tensor([16, 16, 8])).sum((1, 2))
    assert row["execution"] == "vector" and row["executed_flops"] == 2 * int((counts * columns).sum())
    conv = ps.nn.Conv3d(8, 8, 3, kernel_region="cross")
    row = prune.sparsity_report(conv, pairs={"": counts})["layers"][""]
    keep = ps.nn.functional.region_of(3, "cross")
    assert row["execution"] == "offsets" and row["executed_flops"] == 2 * int(counts[keep].sum()) * 64
    report = prune.sparsity_report(nn.Linear(3, 4), torch.randn(5, 3))
    assert report["layers"][""]["executed_flops"] == 2 * 5 * 12 and report["total"]["executed_flops"] == 120


def test_engine_cost_checks_its_pair_counts():
    """engine_cost with pair counts of another length than the weight's
    offsets: a ValueError naming pair_counts (was torch's RuntimeError from a
    broadcast); a weight that is not (K, C_in, C_out): a TypeError."""
    from pointsparse.nn import functional as F

    weight = torch.randn(27, 4, 4)
    assert F.engine_cost(weight, torch.full((27,), 10)) == (2 * 270 * 16, "dense")
    for bad in (torch.zeros(5, dtype=torch.long), torch.zeros(27, 1, dtype=torch.long), [1] * 27):
        with pytest.raises(ValueError, match=r"pair_counts must hold one count per kernel offset \(27"):
            F.engine_cost(weight, bad)
    with pytest.raises(TypeError, match=r"weight must be a \(K, C_in, C_out\) tensor"):
        F.engine_cost(torch.randn(27, 16), torch.full((27,), 10))
    # Fractional counts were truncated, negative ones gave negative FLOPs, and a kernel_size whose volume
    # is not the weight's K reached the core ("region must be 1-D of length 27").
    with pytest.raises(TypeError, match="pair_counts must hold integer counts"):
        F.engine_cost(weight, torch.full((27,), 0.5))
    with pytest.raises(ValueError, match="pair_counts must be >= 0"):
        F.engine_cost(weight, -torch.ones(27, dtype=torch.long))
    with pytest.raises(ValueError, match=r"kernel_size 2 has 8 offsets but the weight's K is 27"):
        F.engine_cost(weight, torch.full((27,), 10), kernel_size=2, kernel_region="cross")


def _engine_cost_cases():
    """``(name, weight, grad mode, context, kernel_region)``: a conv3d weight in
    each dtype, device and mode that decides its path (a gradient wanted
    or not, autocast, the backend policy, a kernel region)."""
    import pointsparse as ps

    g = torch.Generator().manual_seed(0)
    w = torch.randn(27, 4, 6, generator=g)  # (6 columns: bf16 "vector" where float32 runs "dense")
    none = contextlib.nullcontext
    return [
        ("float16 inference", w.half(), False, none, None),
        ("float16 weight wanting a gradient", w.half().requires_grad_(), True, none, None),
        ("float16 weight wanting none, grad mode on", w.half(), True, none, None),
        ("bfloat16 inference", w.bfloat16(), False, none, None),
        ("bfloat16 weight wanting a gradient", w.bfloat16().requires_grad_(), True, none, None),
        ("bfloat16 weight wanting a gradient, no_grad", w.bfloat16().requires_grad_(), False, none, None),
        ("bfloat16 with a region", w.bfloat16(), False, none, "cross"),
        ("float32", w, False, none, None),
        ("float32 wanting a gradient", w.clone().requires_grad_(), True, none, None),
        ("float64", w.double(), False, none, None),
        ("float32 under bf16 autocast", w, False, lambda: torch.autocast("cpu", torch.bfloat16), None),
        ("float32 under fp16 autocast", w, False, lambda: torch.autocast("cpu", torch.float16), None),
        ("float32, backend torch", w, False, lambda: ps.backend("torch"), None),
        ("bfloat16, backend torch", w.bfloat16(), False, lambda: ps.backend("torch"), None),
        ("float16 under fp16 autocast", w.half(), False, lambda: torch.autocast("cpu", torch.float16), None),
    ]


@pytest.mark.parametrize("case", _engine_cost_cases(), ids=lambda case: case[0])
def test_engine_cost_costs_the_path_conv3d_runs(case):
    """engine_cost's execution is that of the path F._conv_path says a
    conv3d call with the weight takes now (an input wanting no gradient):
    "torch" and every pair of every offset times the whole matrix on the
    pure-torch path, the bf16 kernels' choice on "bf16", the float32
    kernels' on "bf16 on float32" and "engine". It costed a float16 weight
    (the torch path in inference), a weight under backend("torch"), and a
    bf16 weight wanting a gradient (the float32 kernels) as the engine's
    kernels in inference run them."""
    from pointsparse.nn import _engine
    from pointsparse.nn import functional as F

    _, weight, grad, context, region = case
    pairs = torch.arange(27) + 10
    with torch.set_grad_enabled(grad), context():
        path = F._conv_path(torch.zeros(3, 4, dtype=weight.dtype), weight, None, 3, region)
        cost = F.engine_cost(weight, pairs, 3, region)
    low = weight.detach().to(torch.bfloat16)
    if path == "torch":
        assert cost == (2 * int(pairs.sum()) * 4 * 6, "torch")
    elif path == "bf16":
        assert cost == _engine.bf16_cost(low, pairs) and cost[1] == "vector"
    else:  # the float32 / float64 kernels (on a 16-bit weight's values widened)
        wide = weight.detach().double() if weight.dtype == torch.float64 else weight.detach().float()
        if path == "bf16 on float32" and weight.dtype == torch.float32:  # (autocast: its precision, widened)
            wide = weight.detach().to(torch.get_autocast_dtype("cpu")).float()
        run = _engine.choose_execution(wide, F.region_of(3, region))
        assert cost == (_engine.executed_flops(wide, pairs, F.region_of(3, region), run), run.name)
        assert cost[1] == ("offsets" if region is not None else "dense")


def test_engine_cost_of_a_weight_without_values_or_off_the_cpu():
    """A meta weight: conv3d refuses it (its feats too), engine_cost now with
    the same ValueError naming weight (was torch's RuntimeError from autocast
    or from copying out of a meta tensor). A CUDA weight runs the pure-torch
    path, whose product over every output site's K columns counts the
    output sites: engine_cost needs num_out there."""
    from pointsparse.nn import functional as F

    pairs = torch.arange(27) + 10
    with pytest.raises(ValueError, match="weight is a meta tensor"):
        F.engine_cost(torch.empty(27, 4, 6, device="meta"), pairs)
    with pytest.raises(TypeError, match="num_out must be"):
        F.engine_cost(torch.randn(27, 4, 6), pairs, num_out=2.5)
    # (a float16 conv runs the float32 kernels on its values widened, in inference as in training)
    assert F.engine_cost(torch.randn(27, 4, 6).half(), pairs, num_out=12) == (2 * int(pairs.sum()) * 24, "dense")
    if not torch.cuda.is_available():
        return
    weight = torch.randn(27, 4, 6, device="cuda")
    with pytest.raises(ValueError, match="num_out"):
        F.engine_cost(weight, pairs)
    assert F.engine_cost(weight, pairs, num_out=12) == (2 * 12 * 27 * 4 * 6, "torch")


def test_kernel_region_offsets_outside_count_in_no_flops():
    """Offsets outside a conv's kernel_region are no weights of the layer:
    values loaded there (initialisation zeroes them) count in neither flops
    nor dense_flops, which then agree with what the conv executes."""
    import pointsparse as ps

    conv = ps.nn.Conv3d(2, 3, 3, kernel_region="cross")
    set_weight(conv, torch.ones(27, 2, 3))  # nonzero at all 27 offsets, 7 of them in the cross
    x = sparse_input(n=12, channels=2)
    counts = naive_pair_counts(x.coords)
    keep = ps.nn.functional.region_of(3, "cross")
    row = prune.sparsity_report(conv, x)["layers"][""]
    assert row["flops"] == row["dense_flops"] == 2 * int(counts[keep].sum()) * 6
    assert row["executed_flops"] == row["dense_flops"] and row["execution"] == "offsets"
    assert prune.sparsity_report(conv, pairs={"": counts})["layers"][""]["flops"] == row["flops"]


def test_compressed_linear_counts_its_format():
    """A formats.SparseLinear is reported: dense-equivalent and nonzero FLOPs
    as the masked Linear's, executed one multiply-add per stored value
    (a 2x2 BSR block stores its zeros) per input row."""
    from pointsparse import formats

    fc = nn.Linear(4, 4)
    with torch.no_grad():
        fc.weight.zero_()
        fc.weight[0, 0], fc.weight[3, 3] = 1.0, 2.0  # two nonzeros in two 2x2 blocks: 8 stored values
    bsr = formats.compress(fc, "bsr", blocksize=(2, 2))
    row = prune.sparsity_report(bsr, torch.randn(5, 4))["layers"][""]  # (compress's default: dense)
    assert row["type"] == "SparseLinear" and row["shape"] == (4, 4) and row["params"] == 16 + 4
    assert row["weight_nonzeros"] == 2 and row["sparsity"] == pytest.approx(14 / 16)
    assert row["flops"] == 2 * 5 * 2 and row["dense_flops"] == 2 * 5 * 16
    assert row["executed_flops"] == 2 * 5 * 16 and row["execution"] == "dense"
    bsr.execution = "format"
    row = prune.sparsity_report(bsr, torch.randn(5, 4))["layers"][""]
    assert row["flops"] == 2 * 5 * 2 and row["dense_flops"] == 2 * 5 * 16
    assert row["executed_flops"] == 2 * 5 * 8 and row["execution"] == "format:BSR"
    csr = formats.compress(fc, "csr")
    csr.execution = "format"
    row = prune.sparsity_report(csr, torch.randn(3, 2, 4))["layers"][""]
    assert row["flops"] == row["executed_flops"] == 2 * 6 * 2  # CSR stores the nonzeros only


def test_compressed_submanifold_conv_counts_brute_force_pairs():
    """A formats.SparseConv3d over a few voxels: FLOPs from brute-force pair
    counts; executed as the engine runs its weight, or per stored value per
    pair (per-offset formats) / per output site (FKW's im2col panel)."""
    import pointsparse as ps
    from pointsparse import formats

    torch.manual_seed(0)
    conv = ps.nn.Conv3d(2, 3, 3)
    weight = torch.randn(27, 2, 3)
    weight[:10] = 0  # ten offsets pruned
    weight[13] = 0
    weight[13, 1, 2] = 1.0  # the centre keeps one weight
    set_weight(conv, weight)
    x = sparse_input(n=12, channels=2)
    counts = naive_pair_counts(x.coords)
    nnz = (weight != 0).sum((1, 2))
    flops, dense = 2 * int((counts * nnz).sum()), 2 * int(counts.sum()) * 6
    source = prune.sparsity_report(conv, x)["layers"][""]
    # BSR 2x2 over W[o].T (3, 2): two blocks (8 values, padding row included) per kept offset, one (4) at the centre
    blocks = torch.tensor([0] * 10 + [8] * 3 + [4] + [8] * 13)
    for fmt, kwargs, stored in (("csr", {}, nnz), ("bsr", {"blocksize": (2, 2)}, blocks)):
        compressed = formats.compress(conv, fmt, **kwargs)
        for execution in ("engine", "format"):
            compressed.execution = execution
            row = prune.sparsity_report(compressed, x)["layers"][""]
            assert row["type"] == "SparseConv3d" and row["shape"] == (27, 2, 3)
            assert row["flops"] == flops and row["dense_flops"] == dense and row["weight_nonzeros"] == int(nnz.sum())
            if execution == "engine":
                assert (row["executed_flops"], row["execution"]) == (source["executed_flops"], source["execution"])
            else:
                assert row["executed_flops"] == 2 * int((counts * stored).sum())
                assert row["execution"] == f"format:{fmt.upper()}"
            assert prune.sparsity_report(compressed, pairs={"": counts})["layers"][""]["executed_flops"] == \
                row["executed_flops"]
    fkw = formats.compress(conv, "fkw")
    fkw.execution = "format"
    row = prune.sparsity_report(fkw, x)["layers"][""]
    assert row["flops"] == flops and row["executed_flops"] == 2 * 12 * fkw.offsets.weight.numel()
    assert fkw.offsets.weight.numel() >= int(nnz.sum())
    bare = prune.sparsity_report(fkw, pairs={"": counts})  # the output sites are unknown
    assert bare["layers"][""]["executed_flops"] is None and bare["total"]["executed_flops"] is None


def test_compressed_model_totals_equal_the_masked_models():
    """compress(model) reports every compressed layer: its totals of params,
    nonzeros, FLOPs and dense FLOPs are the masked model's."""
    from pointsparse import formats

    torch.manual_seed(0)
    body = nn.Sequential(SparseConv(4, 8, kernel_size=3), nn.Linear(8, 2))

    net = _Head(body)
    prune.kernel_structured(body[0], "weight", amount=9, scope="offset")
    prune.l1_unstructured(body[1], "weight", amount=0.5)
    x = sparse_input(n=12, channels=4)
    before = prune.sparsity_report(net, x)
    for fmt in ("csr", "fkw"):
        after = prune.sparsity_report(formats.compress(net, fmt), x)
        assert list(after["layers"]) == ["body.0", "body.1"]
        assert [r["type"] for r in after["layers"].values()] == ["SparseConv3d", "SparseLinear"]
        for key in ("params", "nonzeros", "weight_nonzeros", "sparsity", "flops", "dense_flops"):
            assert after["total"][key] == before["total"][key], (fmt, key)
            for name in before["layers"]:
                assert after["layers"][name][key] == before["layers"][name][key], (fmt, name, key)


def test_kernel_region_offsets_outside_are_no_parameters():
    """The offsets outside a conv's kernel_region are no weights of the
    layer (its FLOPs already left them out): params, nonzeros,
    weight_nonzeros and sparsity count only the region's values, whatever
    is loaded outside it, in the layer's row and the total (they counted all
    27 offsets), and a compressed copy's rows are its source's."""
    import pointsparse as ps

    conv = ps.nn.Conv3d(2, 3, 3, bias=True, kernel_region="cross")
    weight = torch.ones(27, 2, 3)  # nonzero at all 27 offsets, 7 of them in the cross
    weight[13, 0] = 0  # 3 zeros in the region
    set_weight(conv, weight)
    model = nn.Sequential(conv, nn.Linear(3, 4, bias=False))
    report = prune.sparsity_report(model)
    row = report["layers"]["0"]
    assert row["shape"] == (27, 2, 3)  # the weight tensor's shape
    assert row["params"] == 7 * 6 + 3 and row["weight_nonzeros"] == 7 * 6 - 3
    assert row["nonzeros"] == 7 * 6 - 3 + int((conv.bias != 0).sum())
    assert row["sparsity"] == pytest.approx(3 / 42)
    total = report["total"]
    assert total["params"] == 45 + 12 and total["weight_nonzeros"] == 39 + 12
    assert total["sparsity"] == pytest.approx(3 / (42 + 12))
    compressed = ps.formats.compress(model[0], "csr")
    again = prune.sparsity_report(compressed)["layers"][""]
    assert {k: again[k] for k in ("params", "nonzeros", "weight_nonzeros", "sparsity")} == \
        {k: row[k] for k in ("params", "nonzeros", "weight_nonzeros", "sparsity")}


def test_an_attached_filter_skeleton_counts_in_the_weight():
    """A conv with a Filter Skeleton computes with orig * mask * skeleton: its
    row counted the nonzeros of orig * mask (0% sparsity with half its
    stripes scaled to 0) while its FLOPs, taken from the forward, skipped
    them, and compress (which holds the skeleton's weight) reported other
    totals than its source. Now the row counts the weight the conv runs."""
    from pointsparse import formats
    from pointsparse import nn as psnn

    torch.manual_seed(0)
    conv = psnn.Conv3d(4, 5, 3)
    skeleton = prune.attach_filter_skeleton(conv)
    with torch.no_grad():
        skeleton[:13] = 0  # every stripe of offsets 0..12
    model = nn.Sequential(conv)
    x = sparse_input(n=12, channels=4)
    effective = conv.weight_orig * conv.weight_mask * skeleton
    for example in (None, x):
        row = prune.sparsity_report(model, example)["layers"]["0"]
        assert row["weight_nonzeros"] == int((effective != 0).sum()) == 14 * 4 * 5
        assert row["sparsity"] == pytest.approx(13 / 27)
    counts = naive_pair_counts(x.coords)
    per_offset = (effective != 0).reshape(27, -1).sum(1)
    assert row["flops"] == 2 * int((counts * per_offset).sum())
    compressed = prune.sparsity_report(formats.compress(model, "csr"), x)
    assert {k: compressed["total"][k] for k in ("params", "nonzeros", "flops", "dense_flops")} == \
        {k: prune.sparsity_report(model, x)["total"][k] for k in ("params", "nonzeros", "flops", "dense_flops")}


def test_a_report_with_an_input_leaves_each_module_in_its_own_mode():
    """The FLOPs count runs the model in eval mode; model.train(was) after it
    put every module in the model's mode (a BatchNorm frozen in eval mode
    while the rest trains was left training)."""
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).train()
    net[1].eval()
    prune.sparsity_report(net, torch.randn(5, 4))
    assert [m.training for m in net] == [True, False, True] and net.training


def _tied(bias: bool = False) -> nn.Sequential:
    """Three Linear(4, 4); the second shares the first's weight (and bias): 32 distinct weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=bias), nn.Linear(4, 4, bias=bias), nn.Linear(4, 4, bias=bias))
    model[1].weight = model[0].weight
    if bias:
        model[1].bias = model[0].bias
    return model


def test_tied_weights_count_once_in_the_total():
    """Two layers sharing one weight Parameter (a weight-tied head): each row
    still lists its own weight, but the total counted the shared tensor
    twice (48 parameters for a model of 32, its sparsity over 48 entries).
    Each distinct tensor counts once; FLOPs stay per call (both layers run it)."""
    model = _tied(bias=True)
    mask = (torch.arange(16).reshape(4, 4) % 4 != 0).float()  # 4 of 16 pruned
    prune.custom_from_mask(model[0], "weight", mask)
    prune.custom_from_mask(model[1], "weight", mask)  # the same mask: both layers run one weight
    report = prune.sparsity_report(model, torch.randn(3, 4))
    rows, total = report["layers"], report["total"]
    assert [rows[n]["params"] for n in "012"] == [20, 20, 20]
    assert [rows[n]["weight_nonzeros"] for n in "012"] == [12, 12, 16]
    assert total["params"] == sum(p.numel() for p in model.parameters()) == 40
    assert total["weight_nonzeros"] == 12 + 16 and total["sparsity"] == pytest.approx(4 / 32)
    assert total["nonzeros"] == 12 + 16 + int((model[0].bias != 0).sum()) + int((model[2].bias != 0).sum())
    assert total["flops"] == sum(rows[n]["flops"] for n in "012")


def test_a_tied_weight_run_with_different_masks_counts_an_entry_any_layer_runs():
    """Pruning one of two tied layers leaves the other running the
    Parameter unmasked (torch's pruning keeps weight_orig shared): the
    shared tensor still counts once, an entry nonzero while any layer runs it."""
    model = _tied()
    prune.custom_from_mask(model[0], "weight", (torch.arange(16).reshape(4, 4) % 2 == 0).float())
    report = prune.sparsity_report(model)
    assert report["layers"]["0"]["weight_nonzeros"] == 8 and report["layers"]["1"]["weight_nonzeros"] == 16
    assert report["total"]["params"] == 32 and report["total"]["weight_nonzeros"] == 32
    prune.custom_from_mask(model[1], "weight", (torch.arange(16).reshape(4, 4) % 4 != 1).float())
    # entries 1, 5, 9, 13 are pruned in both layers (odd: in layer 0; = 1 mod 4: in layer 1)
    assert prune.sparsity_report(model)["total"]["sparsity"] == pytest.approx(4 / 32)


def test_pairs_are_one_calls_counts_and_count_at_every_call():
    """``pairs`` replaces the counts of each call's kernel map: a conv run
    twice in the example forward counts them twice, as it counts its own
    map twice; without an example input they are one call's FLOPs."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = SparseConv(2, 2, kernel_size=(1, 1, 3))

        def forward(self, t):
            return self.conv(self.conv(t))

    model = Twice()
    x = two_sites()
    counts = naive_pair_counts(x.coords, (1, 1, 3))
    once = prune.sparsity_report(model, pairs={"conv": counts})["layers"]["conv"]["flops"]
    assert once == 2 * int((counts * (model.conv.weight != 0).sum(dim=(1, 2))).sum()) > 0
    assert prune.sparsity_report(model, x, pairs={"conv": counts})["layers"]["conv"]["flops"] == 2 * once
    assert prune.sparsity_report(model, x)["layers"]["conv"]["flops"] == 2 * once


def test_a_conv_the_torch_path_runs_is_costed_as_it_ran():
    """A sparse conv call the engine does not serve (``backend("torch")``)
    runs the pure-torch sum: every offset's
    pairs times the whole ``(C_in, C_out)`` matrix, all-zero offsets and
    offsets outside a kernel_region (zeroed) included. The report gave it
    the engine's choice ("offsets" / "vector") and its smaller count; now
    ``execution`` is "torch" and the FLOPs those pairs. Implied and dense
    FLOPs do not depend on the path."""
    import pointsparse as ps

    torch.manual_seed(0)
    conv = SparseConv(8, 40, 3)
    with torch.no_grad():
        conv.weight[:10] = 0
    prune.panel_structured(conv, "weight", 0.5)
    x = sparse_input(n=12, channels=8)
    counts = naive_pair_counts(x.coords)
    run = 2 * int(counts.sum()) * 8 * 40
    engine = prune.sparsity_report(conv, x)["layers"][""]
    assert engine["execution"] in ("offsets", "vector") and engine["executed_flops"] < run
    with ps.backend("torch"):
        row = prune.sparsity_report(conv, x)["layers"][""]
        assert prune.sparsity_report(conv, x, pairs={"": counts})["layers"][""]["executed_flops"] == run
    assert (row["executed_flops"], row["execution"]) == (run, "torch")
    assert (row["flops"], row["dense_flops"]) == (engine["flops"], engine["dense_flops"])
    # a float16 conv in inference runs the float32 kernels on its values widened (it ran the torch sum)
    half = prune.sparsity_report(conv.half(), SparseTensor(x.feats.half(), x.coords))["layers"][""]
    assert [half[k] for k in ("executed_flops", "execution", "flops")] == \
        [engine[k] for k in ("executed_flops", "execution", "flops")]
    cross = SparseConv(2, 3, 3, kernel_region="cross")
    small = sparse_input(n=12, channels=2)
    with ps.backend("torch"):
        row = prune.sparsity_report(cross, small)["layers"][""]
    keep = ps.nn.functional.region_of(3, "cross")
    assert row["dense_flops"] == 2 * int(counts[keep].sum()) * 6
    assert (row["executed_flops"], row["execution"]) == (2 * int(counts.sum()) * 6, "torch")



class _Calls(nn.Module):
    """One sparse conv called once per entry of ``paths``, in order: on the
    engine (``"engine"``) or the pure-torch path (``"torch"``)."""

    def __init__(self, conv, paths):
        super().__init__()
        self.conv, self.paths = conv, paths

    def forward(self, t):
        import pointsparse as ps

        for path in self.paths:
            with ps.backend("torch") if path == "torch" else contextlib.nullcontext():
                t = self.conv(t)
        return t


def test_a_layer_called_on_different_executions_is_labelled_with_each():
    """A conv called several times in the forward sums its calls' FLOPs; its
    ``execution`` showed the last call's alone (an engine call skipping
    offsets and a torch call: "torch" beside the sum of both). Now the
    distinct executions in call order joined by "+"; calls that agree keep
    the one label."""
    torch.manual_seed(0)
    conv = SparseConv(4, 4, 3)
    with torch.no_grad():
        conv.weight[:10] = 0  # (whole offsets: the engine skips them)
    x = sparse_input(n=12, channels=4)
    counts = naive_pair_counts(x.coords)  # (a submanifold conv: every call on the same sites)
    engine, run = 2 * int(counts[10:].sum()) * 16, 2 * int(counts.sum()) * 16

    def row(*paths):
        return prune.sparsity_report(_Calls(conv, paths), x)["layers"]["conv"]

    assert (row("engine")["execution"], row("torch")["execution"]) == ("offsets", "torch")
    mixed = row("engine", "torch", "engine")
    assert (mixed["execution"], mixed["executed_flops"]) == ("offsets+torch", 2 * engine + run)
    assert mixed["flops"] == 3 * row("engine")["flops"]
    assert row("torch", "engine")["execution"] == "torch+offsets"
    same = row("engine", "engine")
    assert (same["execution"], same["executed_flops"]) == ("offsets", 2 * engine)
    assert row("torch", "torch")["execution"] == "torch"
    assert "(offsets+torch)" in prune.format_report(prune.sparsity_report(_Calls(conv, ("engine", "torch")), x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_gpu_conv_is_costed_as_the_torch_path_runs_it(monkeypatch):
    """On a GPU a sparse conv runs the torch path's one product over every
    output site's K columns (a zero for each absent neighbour, multiplied
    too) where the columns fit, else the per-offset sum over the pairs."""
    from pointsparse.nn import reference

    conv = SparseConv(4, 6, 3).cuda()
    x = sparse_input(n=12, channels=4)
    counts = naive_pair_counts(x.coords)
    gpu = SparseTensor(x.feats.cuda(), x.coords.cuda())
    row = prune.sparsity_report(conv, gpu)["layers"][""]
    assert (row["executed_flops"], row["execution"]) == (2 * 12 * 27 * 4 * 6, "torch")
    monkeypatch.setattr(reference, "GEMM_COLUMN_BYTES", 12 * 27 * 4 * 4 - 1)
    row = prune.sparsity_report(conv, gpu)["layers"][""]
    assert (row["executed_flops"], row["execution"]) == (2 * int(counts.sum()) * 4 * 6, "torch")
