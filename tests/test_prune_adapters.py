"""The layer-adapter registry: one user-registered layer type reaches every
part of the toolkit that asks about layers (structured methods, criteria, the
report, the sparse formats), and is unknown to all of them unregistered."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pointsparse.prune as prune
from pointsparse import formats
from pointsparse.formats.balance import default_row_dim
from pointsparse.prune import adapters, criteria


class InOut(nn.Module):
    """A linear layer of our own whose weight is stored (in, out)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_in, c_out, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return x @ self.weight


ADAPTER = adapters.LayerAdapter(axes=lambda m: {"weight": {"out": 1, "in": 0}})


@pytest.fixture
def registered():
    adapters.register(InOut, ADAPTER)
    yield
    adapters.unregister(InOut)


def _model():
    return nn.Sequential(InOut(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def test_unregistered_layer_is_unknown_everywhere():
    model = _model()
    assert not adapters.is_layer(model[0]) and default_row_dim(model[0]) == 0
    assert list(prune.sparsity_report(model)["layers"]) == ["3"]
    assert criteria.bn_pairs(model) == []
    with pytest.raises(TypeError, match="layout"):
        prune.layout_of(model[0])


def test_registered_layer_reaches_methods_criteria_report_and_formats(registered):
    model = _model()
    layer = model[0]
    assert prune.layout_of(layer) == prune.WeightLayout(1, 0, ())
    assert adapters.out_channels(layer) == 6 and adapters.in_channels(layer) == 4
    # structured methods cut along its output axis (1)
    prune.channel_structured(layer, "weight", amount=2)
    assert int((layer.weight_mask.sum(0) == 0).sum()) == 2 and bool((layer.weight_mask.sum(1) > 0).all())
    # criteria: the BatchNorm after it is found, its scales spread along axis 1
    with torch.no_grad():
        model[1].weight.copy_(torch.arange(6.0))
    assert criteria.bn_pairs(model) == [(layer, model[1])]
    scores = criteria.bn_scaling(model)[(layer, "weight")]
    assert torch.equal(scores, torch.arange(6.0).expand(4, 6))
    # the report: 2 * rows * nonzeros (each weight entry meets one input per output row)
    report = prune.sparsity_report(model, torch.randn(5, 4))
    row = report["layers"]["0"]
    assert row["type"] == "InOut" and row["weight_nonzeros"] == 16
    assert row["flops"] == 2 * 5 * 16 and row["dense_flops"] == 2 * 5 * 24 and row["execution"] == "dense"
    # the formats: rows are output channels; FKW holds the weight as (out, in)
    assert default_row_dim(layer) == 1
    dense = (layer.weight_orig * layer.weight_mask).detach()
    assert torch.equal(formats.FKW.from_module(layer).to_dense(), dense.t())


def test_sparsity_counts_a_kernel_region_conv_inside_its_region():
    """sparsity and layer_sparsity count the weights of the layer, as the
    report does: a kernel_region conv's offsets inside the region (the 20
    zeros outside a fresh "cross" conv's 7 offsets made it 74% sparse)."""
    import pointsparse as ps

    conv = ps.nn.Conv3d(2, 3, 3, kernel_region="cross")
    model = nn.Sequential(conv, nn.Linear(3, 4))
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.weight[13, 0] = 0  # 3 zeros inside the region, 60 nonzeros outside it
        model[1].weight.fill_(1.0)
    assert adapters.layer_sparsity(model) == {"0": pytest.approx(3 / 42), "1": 0.0}
    assert adapters.sparsity(model) == pytest.approx(3 / (42 + 12))
    assert adapters.sparsity(model) == pytest.approx(prune.sparsity_report(model)["total"]["sparsity"])


def test_kernel_extents_are_the_box_a_kernel_region_spans():
    """kernel_extents: the kernel's shape for a plain layer, the box its
    region spans for a kernel_region conv; beside kernel_volume, the
    region's offset count."""
    import pointsparse as ps

    assert adapters.kernel_extents(nn.Linear(2, 3)) == ()
    assert adapters.kernel_extents(nn.Conv2d(2, 3, (3, 5))) == (3, 5)
    assert adapters.kernel_extents(ps.nn.Conv3d(2, 3, (1, 3, 3))) == (1, 3, 3)
    for region, extents, volume in (("cross", (3, 3, 3), 7), ([13], (1, 1, 1), 1), ([12, 13], (1, 1, 2), 2),
                                    ([0, 26], (3, 3, 3), 2), (range(9, 18), (1, 3, 3), 9)):
        conv = ps.nn.Conv3d(2, 3, 3, kernel_region=region)
        assert adapters.kernel_extents(conv) == extents, region
        assert adapters.kernel_volume(conv) == volume, region


def test_apply_masks_checks_each_mask_before_pruning_any():
    """apply_masks (lottery's train_masked, prune_at_init) gave an
    AttributeError for a list mask, a mask dict that is a list, or a layer
    without weight ("'ReLU' object has no attribute 'weight'"), and a mask of
    0.5s silently halved the weights. Now a TypeError / ValueError naming the
    layer, before any layer is pruned."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    good = torch.ones(4, 3, dtype=torch.bool)
    for masks, error, match in [
        ([good], TypeError, r"mask_dict must be a dict \{layer name: mask\}; got list"),
        ({"0": good, "2": [[1, 0]] * 2}, TypeError, r"mask for '2' must be a tensor .*; got list"),
        ({"0": good, "2": torch.full((2, 4), 0.5)}, ValueError, r"mask for '2' must hold only 0 and 1"),
        ({"0": good, "1": torch.ones(4)}, ValueError, r"layer '1' is a ReLU, not a prunable layer"),
        ({"0": good, "5": torch.ones(2, 4)}, ValueError, r"layer '5' is not a submodule"),
        ({"0": good, "2": torch.ones(4, 2)}, ValueError, r"mask for '2' must have the weight's shape \(2, 4\)"),
    ]:
        with pytest.raises(error, match=match):
            adapters.apply_masks(model, masks)
        assert not prune.is_pruned(model)
    adapters.apply_masks(model, {})
    adapters.apply_masks(model, {"0": good, "2": torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])})
    assert int((model[2].weight == 0).sum()) == 2 and not bool((model[0].weight == 0).any())


def test_a_weight_layout_names_each_axis_once():
    """WeightLayout took any values: (0, 0) failed later inside torch's
    permute ("repeated dim"), ("a", 1) on the first use. Now a TypeError /
    ValueError at construction; numpy integers and a list of kernel axes are
    taken as Python ints and a tuple (a frozen, hashable value)."""
    import numpy as np

    for args, error, match in [
        ((0, 0), ValueError, r"each axis of a 2-dim weight once .*got out_axis=0, in_axis=0, kernel_axes=\(\)"),
        ((0, 1, (3,)), ValueError, r"each axis of a 3-dim weight once"),
        ((-1, 0, (1,)), ValueError, r"out_axis must be an int >= 0"),
        (("a", 1), TypeError, r"out_axis must be an int"),
        ((0, True), TypeError, r"in_axis must be an int"),
        ((0, 1, 2), TypeError, r"kernel_axes must be a tuple of ints"),
        ((0, 1, (2.0,)), TypeError, r"kernel_axes must be an int"),
    ]:
        with pytest.raises(error, match=match):
            prune.WeightLayout(*args)
    layout = prune.WeightLayout(np.int64(2), np.int32(1), [0])
    assert layout == prune.WeightLayout(2, 1, (0,)) and type(layout.out_axis) is int and hash(layout)
    with pytest.raises(ValueError, match="each axis"):
        prune.channel_structured(nn.Linear(2, 3), "weight", 1, layout=prune.WeightLayout(0, 0))


def test_sparsity_counts_the_mask_a_loaded_state_dict_brought():
    """sparsity / layer_sparsity (iterative_prune's and lottery's reached
    sparsity, the prune app's summary) read module.weight, the product torch
    cached at the last forward: a pruned checkpoint loaded into an
    identity-pruned model read 0.0 (sparsity_report: 0.5) until a forward."""
    source = nn.Sequential(nn.Linear(4, 4))
    prune.l1_unstructured(source[0], "weight", 8)
    model = nn.Sequential(nn.Linear(4, 4))
    prune.identity(model[0], "weight")
    model.load_state_dict(source.state_dict())
    assert adapters.sparsity(model) == 0.5 and adapters.layer_sparsity(model) == {"0": 0.5}
    assert prune.sparsity_report(model)["total"]["sparsity"] == 0.5


def test_sparsity_counts_an_attached_filter_skeleton_as_the_report_and_the_graph_do():
    """A conv with a Filter Skeleton computes with orig * mask * skeleton:
    with half its filters' scales at 0, sparsity / layer_sparsity (the prune
    app's summary) said 0% while sparsity_report, channel_l1 and the
    dependency graph saw those filters as zero (50%); after prune.remove,
    before the next forward folds the skeleton, too. Every one of them
    reads the weight the layer runs now."""
    from pointsparse.prune import graph as dependency, surgery

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, bias=False), nn.Conv2d(6, 2, 1))
    skeleton = prune.attach_filter_skeleton(model[0])
    with torch.no_grad():
        skeleton[::2] = 0  # every stripe of filters 0, 2, 4
    for removed in (False, True):
        if removed:
            prune.remove(model[0], "weight")  # (the skeleton stays until the next forward folds it)
            assert hasattr(model[0], "weight_skeleton")
        runs = adapters.weight_now(model[0]).detach()
        assert torch.equal(runs, (adapters.raw(model[0]) * skeleton
                                  * (1 if removed else model[0].weight_mask)).detach())
        assert adapters.layer_sparsity(model)["0"] == 0.5
        assert adapters.sparsity(model) == pytest.approx(prune.sparsity_report(model)["total"]["sparsity"])
        assert prune.sparsity_report(model)["layers"]["0"]["sparsity"] == 0.5
        assert surgery.channel_l1(model[0])[::2].eq(0).all()
        graph = dependency.DependencyGraph(model, torch.randn(1, 4, 5, 5))
        assert [c.tolist() for c in graph.masked_channels().values()] == [[0, 2, 4]]


def test_sparsity_counts_compressed_layers_as_the_report_does():
    """formats.compress turns a model's Linear / sparse conv into
    SparseLinear / SparseConv3d, which sparsity_report counts (on the weight
    the format holds, the source's totals): sparsity / layer_sparsity left
    them out, 0.0 for a compressed model with a torch conv left in it (the
    report: 58%) and a ValueError "no prunable layer" for one without."""
    import pointsparse as ps

    torch.manual_seed(0)
    source = nn.ModuleDict({"conv": ps.nn.Conv3d(4, 8, 3), "head": nn.Conv2d(8, 2, 1), "fc": nn.Linear(8, 3)})
    prune.l1_unstructured(source["conv"], "weight", 0.6)
    prune.l1_unstructured(source["fc"], "weight", 0.5)
    compressed = formats.compress(source, "csr")
    assert type(compressed["conv"]).__name__ == "SparseConv3d"
    expected = adapters.layer_sparsity(source)
    assert adapters.layer_sparsity(compressed) == expected and expected["conv"] == pytest.approx(0.6, abs=1e-3)
    assert adapters.sparsity(compressed) == adapters.sparsity(source) \
        == pytest.approx(prune.sparsity_report(compressed)["total"]["sparsity"])
    assert adapters.sparsity(compressed, ["fc"]) == 0.5 and adapters.layer_sparsity(compressed, ["conv"]) == \
        {"conv": expected["conv"]}
    only = formats.compress(nn.Sequential(source["conv"]), "csr")
    assert adapters.sparsity(only) == expected["conv"]
    with pytest.raises(ValueError, match="not a submodule"):
        adapters.sparsity(compressed, ["nope"])


def test_sparsity_counts_a_tied_weight_once():
    """Two layers sharing one weight Parameter: sparsity counted it once per
    layer (20 of 48 entries zero for 12 of 32 distinct ones)."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.fill_(1.0)
        model[0].weight[:2] = 0.0  # 8 of the shared 16
        model[2].weight[:1] = 0.0  # 4 of the other 16
    assert adapters.sparsity(model) == pytest.approx(12 / 32)
    assert adapters.sparsity(model, ["0", "1"]) == pytest.approx(8 / 16)
    assert adapters.layer_sparsity(model) == {"0": 0.5, "1": 0.5, "2": 0.25}


def test_a_learned_voxel_prunes_scorer_is_left_out_of_the_prunable_layers_unless_named():
    """A learned VoxelPrune's scorer (a Linear(C, 1) that ranks the voxels) was one of the model's prunable
    layers, so a global magnitude pruning of the network sparsified it too (pruned whole, every score is its
    bias and the kept voxels those earliest in each item): it is the pruning's, not the network's. Named, it
    is pruned as asked."""
    from pointsparse import nn as spnn
    from pointsparse.prune.procedure import global_magnitude_prune

    torch.manual_seed(0)
    net = nn.Sequential(spnn.Conv3d(4, 8, 3), spnn.VoxelPrune(0.5, score="learned", in_channels=8),
                        spnn.Conv3d(8, 8, 3), spnn.VoxelSkip(spnn.Conv3d(8, 8, 3), 0.5, score="learned",
                                                              in_channels=8))
    names = [n for n, _ in adapters.prunable_layers(net)]
    assert names == ["0", "2", "3.module"]
    global_magnitude_prune(net, 0.5)
    assert not hasattr(net[1].scorer, "weight_mask") and not hasattr(net[3].prune.scorer, "weight_mask")
    assert hasattr(net[0], "weight_mask")
    assert [n for n, _ in adapters.prunable_layers(net, ["1.scorer"])] == ["1.scorer"]


def test_naming_a_block_in_layers_names_the_prunable_layers_inside_it():
    """A pointsparse Linear holds its torch Linear as ``fn``: naming the
    module a model was built with (``layers=['head']``) was refused as
    "layer 'head' is a Linear, not a prunable layer", which reads as if a
    Linear could not be pruned. Now the message says it is a
    pointsparse.nn.Linear and names the prunable layer inside it (the
    layers inside a block, as for a Sequential); a module without layers
    inside keeps the short message."""
    import pointsparse as ps
    from pointsparse.prune.procedure import global_magnitude_prune

    model = nn.Sequential(ps.nn.Conv3d(2, 4, 3), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    model.add_module("head", ps.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"layer 'head' is a Linear \(pointsparse\.nn\.Linear\), not a prunable "
                                         r"layer itself; name the prunable layer inside it: \['head\.fn'\]"):
        global_magnitude_prune(model, 0.5, ["head"])
    with pytest.raises(ValueError, match=r"layer '1' is a Sequential \(torch\.nn\.Sequential\), .* inside it: \['1\.0'\]"):
        adapters.prunable_layers(model, ["1"])
    with pytest.raises(ValueError, match=r"layer '1\.1' is a ReLU, not a prunable layer$"):
        adapters.prunable_layers(model, ["1.1"])
    assert not prune.is_pruned(model)
    global_magnitude_prune(model, 0.5, ["head.fn"])
    assert adapters.sparsity(model, ["head.fn"]) == pytest.approx(0.5)
