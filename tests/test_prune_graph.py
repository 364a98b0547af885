"""The dependency graph: every coupled channel group found by tracing, cuts
that are exact against the masked model (MinkUNet, SPVCNN, a torch ResNet),
cut networks that still train, BatchNorm shifts folded or refused, user
adapters, importance-driven plans."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import pointsparse as ps
from pointsparse.models import MinkUNet, SPVCNN
from pointsparse.prune import adapters, criteria, graph as G
from prune_procedures_support import ResidualNet, region_chain, sparse_input

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_norms(net: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)
    return net.eval()


class Block2d(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet2d(nn.Module):
    """A ResNet-style CNN: stem, two stages of basic blocks, global pooling, Linear."""

    def __init__(self, classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(Block2d(16, 16), Block2d(16, 16))
        self.layer2 = nn.Sequential(Block2d(16, 32, 2), Block2d(32, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _points(n=2500, extent=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 3, generator=g) * extent
    vox, inverse = ps.voxelize(pts, feats=torch.rand(n, 3, generator=g), voxel_size=1.0)
    return vox, inverse, pts, torch.zeros(n, dtype=torch.long)


def _minkunet():
    torch.manual_seed(0)
    return _randomize_norms(MinkUNet(3, 4, cr=0.25))


def _cases():
    return {
        "minkunet": (_minkunet, lambda: sparse_input(n=1500, extent=20), lambda y: y.feats),
        "spvcnn": (lambda: (torch.manual_seed(0), _randomize_norms(SPVCNN(3, 4, cr=0.25)))[1], _points, lambda y: y),
        "resnet2d": (lambda: _randomize_norms(ResNet2d()), lambda: torch.randn(4, 3, 12, 12), lambda y: y),
    }


def _run(net, x):
    return net(*x) if isinstance(x, tuple) else net(x)


def test_every_coupled_group_of_minkunet():
    net = MinkUNet(4, 19, cr=0.25)
    graph = G.DependencyGraph(net, sparse_input(n=400, channels=4, extent=16))
    layers = [n for n, m in net.named_modules() if adapters.is_layer(m)]
    assert len(layers) == 50 and sorted(graph.layers()) == sorted(layers)
    # stem: 2 convs; 4 encoder stages: 1 strided conv + 2 blocks (3 groups: the stage's residual stream and
    # each block's inner channels), the strided conv's output being its own group; 4 decoder stages alike.
    assert len(graph.groups) == 33
    assert [g.fixed for g in graph.fixed_groups] == ["network output"]
    out_members = {m.module for g in graph.groups for m in g.members if m.role == "out"}
    assert out_members | {"classifier.fn"} == set(layers) | {n for n, m in net.named_modules()
                                                              if isinstance(m, nn.BatchNorm1d)}
    stream = graph.group("down.1.1.main.3")
    assert {"down.1.1.shortcut.0", "down.1.2.main.3", "down.1.1.main.4"} <= set(stream.modules("out"))
    # the skip of stage 1 feeds the decoder's concatenation at its slice (after the 2*8 upsampled channels)
    skip = [m for m in stream.members if m.module == "fuse.1.0.main.0"]
    assert skip == [G.Member("fuse.1.0.main.0", "in", 32, 48, 0)]


@pytest.mark.parametrize("case", ["minkunet", "spvcnn", "resnet2d"])
def test_cut_equals_masked_model(case):
    make, data, out = _cases()[case]
    net, x = make(), data()
    graph = G.DependencyGraph(net, x)
    keep = G.plan(graph, 0.5)
    graph.mask(keep)
    masked = out(_run(net, x)).detach()
    n_before = sum(p.numel() for p in net.parameters())
    graph.cut(keep)
    cut = out(_run(net, x)).detach()
    assert sum(p.numel() for p in net.parameters()) < 0.4 * n_before
    assert float((cut - masked).norm() / masked.norm()) <= 1e-5
    copy.deepcopy(net)  # right after the cut
    net.train()
    loss = out(_run(net, x)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    copy.deepcopy(net)  # after a training-mode forward and backward
    net.eval()
    assert out(_run(copy.deepcopy(net), x)).shape == masked.shape


def test_masked_channel_is_exactly_zero_after_its_norm_in_train_mode():
    net, x = _minkunet(), sparse_input(n=1500, extent=20)
    graph = G.DependencyGraph(net, x)
    g = graph.group("down.1.1.main.3")
    graph.mask({g.name: torch.arange(0, g.size, 2)})
    seen = {}
    net.down[1][1].main[4].register_forward_hook(lambda m, i, o: seen.update(y=o.feats.detach()))
    net.train()
    net(x)
    assert torch.all(seen["y"][:, 1::2] == 0) and torch.any(seen["y"][:, ::2] != 0)


class _Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return x.with_feats(self.fn(x.feats)) if isinstance(x, ps.SparseTensor) else self.fn(x)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-conv", "linear"])
@pytest.mark.parametrize("mid", ["sigmoid", "exp", "plus-one", "batchnorm-no-affine", "batchnorm-sigmoid"])
def test_mask_then_cut_is_exact_through_an_op_that_maps_zero_to_nonzero(mid, sparse):
    """mask zeroed the producers and their norms only, so an op between the
    mask and the consumer that makes something else than 0 of a zero
    (sigmoid, exp, ``x + 1``, a BatchNorm without affine parameters: its
    running-mean shift) sent a nonzero value of each masked channel into the
    consumer, and the cut model, which has no such channel, computed another
    output, silently. mask now masks the consumers' inputs of the dropped
    channels too: the masked model is the cut one (eval mode, float64)."""
    torch.manual_seed(0)
    bn = ps.nn.BatchNorm if sparse else nn.BatchNorm1d
    mids = {"sigmoid": [_Op(torch.sigmoid)], "exp": [_Op(torch.exp)], "plus-one": [_Op(lambda t: t + 1)],
            "batchnorm-no-affine": [bn(8, affine=False)], "batchnorm-sigmoid": [bn(8), _Op(torch.sigmoid)]}[mid]
    layer = (lambda i, o: ps.nn.Conv3d(i, o, 3)) if sparse else nn.Linear
    net = nn.Sequential(layer(3, 8), *mids, layer(8, 4)).double()
    for m in net.modules():
        if isinstance(m, (ps.nn.BatchNorm, nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = sparse_input(n=200, extent=8)
    x = x.double() if sparse else x.feats.double()
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == ["0"]
    keep = {"0": [0, 1, 2, 4, 5, 6]}
    graph.mask(keep)
    with torch.no_grad():
        masked = _feats(net(x))
        graph.cut(keep)
        cut = _feats(net(x))
    assert cut.shape == masked.shape
    torch.testing.assert_close(cut, masked, rtol=1e-12, atol=1e-12)


class _NormOfChannels(nn.Module):
    """a -> op -> y / (|y| over the channels + 1) -> b: the norm is no layer
    and a zero channel adds nothing to it, so the graph leaves a cuttable."""

    def __init__(self, op):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.op = ps.nn.Conv3d(3, 8, 3), ps.nn.Conv3d(8, 4, 3), op

    def forward(self, x):
        y = self.op(self.a(x).feats)
        return self.b(x.with_feats(y / (y.norm(dim=1, keepdim=True) + 1)))


@pytest.mark.parametrize("op", [torch.sigmoid, torch.relu], ids=["sigmoid", "relu"])
def test_mask_refuses_a_norm_over_channels_that_a_masked_channel_reaches_nonzero(op):
    """A norm over the channels outside any layer (a magnitude voxel score)
    is left cuttable because a masked channel, 0, adds nothing to it; with a
    sigmoid before it the masked channel is 0.5 there, and mask then cut gave
    another output than the masked model, silently (masking the consumers
    does not reach a norm). mask now refuses, with nothing masked, naming
    the group and the op; with a ReLU the cut is exact."""
    net = _NormOfChannels(op).double().eval()
    x = sparse_input(n=200, extent=8).double()
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == ["a"]
    keep = {"a": [0, 1, 2, 4, 5, 6]}
    if op is torch.sigmoid:
        with pytest.raises(ValueError, match=r"masked channels of group 'a' reach norm over the channels .* as "
                                             r"nonzero values.*nothing was masked"):
            graph.mask(keep)
        assert not ps.prune.is_pruned(net)
        return
    graph.mask(keep)
    with torch.no_grad():
        masked = net(x).feats
        graph.cut(keep)
        torch.testing.assert_close(net(x).feats, masked, rtol=1e-12, atol=1e-12)


def _feats(y):
    return y.feats if isinstance(y, ps.SparseTensor) else y


def test_cut_one_group_keeps_train_and_eval_running():
    for make, data, out in _cases().values():
        net, x = make(), data()
        graph = G.DependencyGraph(net, x)
        for g in (graph.groups[0], graph.groups[len(graph.groups) // 2], graph.groups[-1]):
            n = copy.deepcopy(net)
            gg = G.DependencyGraph(n, x)
            gg.cut({g.name: torch.arange(max(1, g.size // 3))})
            for mode in (True, False):
                n.train(mode)
                y = out(_run(n, x))
                y.sum().backward()
                assert torch.isfinite(y).all()


def test_residual_encoder_groups_and_head():
    net = ResidualNet().eval()
    graph = G.DependencyGraph(net, sparse_input(n=80))
    assert [g.name for g in graph.groups] == ["stem.0", "stem.3", "block.main.0"]
    stream = graph.group("stem.3")
    assert set(stream.modules("out")) == {"stem.3", "stem.4", "block.main.3", "block.main.4"}
    assert set(stream.modules("in")) == {"block.main.0", "head.fn"}


def test_group_by_index_range():
    net = ResidualNet().eval()
    graph = G.DependencyGraph(net, sparse_input(n=80))
    assert graph.group(0).name == "stem.0" and graph.group(np.int64(2)).name == "block.main.0"
    assert graph.group(-1).name == "block.main.0"  # (a list's negative index)
    for bad in (3, -4, 99):
        with pytest.raises(IndexError, match=rf"name_or_index {bad} is out of range: the graph has 3 cuttable groups"):
            graph.group(bad)


def test_channel_structured_mask_folds_batchnorm_shift_into_linear_consumers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    _randomize_norms(net)
    with torch.no_grad():
        net[1].bias[:5] = 0.4  # a positive shift: ReLU passes a constant through the masked channels
    ps.prune.channel_structured(net[0], "weight", amount=5, n=1)
    net[0].bias.data[net[0].weight.abs().sum(1) == 0] = 0.0
    x = torch.randn(32, 6)
    ref = net(x)
    graph = G.DependencyGraph(net, x)
    assert graph.remove_masked() == {"0": 5}
    assert net[0].out_features == 5 and net[3].in_features == 5 and net[1].num_features == 5
    assert torch.allclose(net(x), ref, atol=1e-5, rtol=1e-5)


def test_sparse_consumer_of_a_shifted_masked_channel_is_refused():
    net, x = _minkunet(), sparse_input(n=1500, extent=20)
    conv = net.down[0][1].main[0]
    ps.prune.channel_structured(conv, "weight", amount=2, n=1)
    graph = G.DependencyGraph(net, x)
    assert len(graph.masked_channels()["down.0.1.main.0"]) == 2
    with pytest.raises(ValueError, match="cannot be folded exactly"):
        graph.remove_masked()


def test_a_sigmoid_after_a_channel_mask_is_named_in_remove_masked_s_refusal():
    """A channel masked on its conv alone, then a sigmoid (0.5 where the
    channel is 0), then a sparse conv of kernel 3: remove_masked refuses, as
    it must, but blamed "a BatchNorm shift after the mask" in a model with
    no BatchNorm and told to zero BatchNorm entries. It names both causes
    and DependencyGraph.mask, after which the cut is exact."""
    torch.manual_seed(0)
    net = nn.Sequential(ps.nn.Conv3d(3, 8, 3, bias=False), _Op(torch.sigmoid), ps.nn.Conv3d(8, 2, 3)).eval()
    x = sparse_input(n=200, extent=8)
    ps.prune.channel_structured(net[0], "weight", amount=3, n=1)
    graph = G.DependencyGraph(net, x)
    with pytest.raises(ValueError, match=r"is the constant 0\.5 \(a BatchNorm's shift or an op that makes something "
                                         r"else than 0 of a zero \(a sigmoid, exp, x \+ 1\) after the mask\).*"
                                         r"mask with DependencyGraph\.mask, which masks the norms and the consumers"):
        graph.remove_masked()
    keep = {"0": [c for c in range(8) if c not in graph.masked_channels()["0"].tolist()]}
    graph.mask(keep)
    with torch.no_grad():
        masked = net(x).feats
        assert graph.remove_masked() == {"0": 3}
        torch.testing.assert_close(net(x).feats, masked, rtol=1e-5, atol=1e-6)


def test_channel_structured_mask_with_zeroed_norm_is_cut_exactly():
    net, x = _minkunet(), sparse_input(n=1500, extent=20)
    conv, bn = net.down[0][1].main[0], net.down[0][1].main[1]
    ps.prune.channel_structured(conv, "weight", amount=3, n=1)
    dead = conv.weight.abs().sum((0, 1)) == 0
    with torch.no_grad():
        bn.weight[dead] = 0
        bn.bias[dead] = 0
    ref = net(x).feats
    assert G.DependencyGraph(net, x).remove_masked() == {"down.0.1.main.0": 3}
    assert conv.out_channels == conv.weight.shape[2] == 5
    assert float((net(x).feats.detach() - ref).norm() / ref.norm()) <= 1e-5


def test_plans_from_criteria_and_rounding():
    net, x = _minkunet(), sparse_input(n=600, extent=16)
    graph = G.DependencyGraph(net, x)
    scores = criteria.bn_scaling(net)
    keep = G.plan(graph, 0.5, scores=scores, multiple=4)
    assert all(len(v) % 4 == 0 and len(v) == G.kept_count(graph.group(k).size, 0.5, 4) for k, v in keep.items())
    g = graph.group("stem.0.0")
    gamma = net.stem[0][1].weight.detach().abs()
    expected = torch.sort(torch.topk(gamma, len(keep[g.name])).indices).values
    assert torch.equal(keep[g.name], expected)  # the only scored member of this group is its conv
    glob = G.plan(graph, 0.5, scope="global", multiple=1)
    assert sum(len(v) for v in glob.values()) == pytest.approx(0.5 * sum(g.size for g in graph.groups), abs=1)
    assert G.kept_count(24, 0.5, 16) == 16 and G.kept_count(8, 0.3, 16) == 2 and G.kept_count(96, 0.35, 8) == 32


def test_user_adapter_and_unknown_layers():
    class Scale(nn.Module):  # per-channel parameter, no adapter: its channels are fixed
        def __init__(self, c):
            super().__init__()
            self.s = nn.Parameter(torch.ones(c))

        def forward(self, x):
            return x * self.s

    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), Scale(6), nn.Linear(6, 2))
    graph = G.DependencyGraph(net, torch.randn(5, 4))
    assert graph.groups == [] and "no adapter" in graph.fixed_groups[0].fixed
    adapters.register(Scale, adapters.LayerAdapter(axes=lambda m: {"s": {"out": 0}}, kind="norm",
                                                   set_channels=lambda m, role, n: None))
    try:
        graph = G.DependencyGraph(net, torch.randn(5, 4))
        assert [g.name for g in graph.groups] == ["0"] and graph.groups[0].modules() == ["0", "2", "3"]
        graph.cut({"0": [0, 2, 5]})
        assert net[2].s.shape == (3,) and net(torch.randn(5, 4)).shape == (5, 2)
    finally:
        adapters.unregister(Scale)


def test_channel_mixing_ops_fix_channels():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)
            self.register_buffer("rot", torch.randn(6, 6))

        def forward(self, x):
            return self.b(torch.softmax(self.a(x), 1) @ self.rot)

    graph = G.DependencyGraph(Mix(), torch.randn(5, 4))
    assert graph.groups == [] and "mixed by" in graph.fixed_groups[0].fixed


def test_bad_inputs():
    net = ResidualNet().eval()
    graph = G.DependencyGraph(net, sparse_input(n=80))
    with pytest.raises(ValueError, match="names no cuttable"):
        graph.group("head.fn")
    with pytest.raises(ValueError, match="at least one"):
        graph.cut({"stem.0": []})
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        graph.cut({"stem.0": [8]})
    with pytest.raises(TypeError, match="torch.nn.Module"):
        G.DependencyGraph("net", None)
    with pytest.raises(ValueError, match="keep ratio"):
        G.kept_count(8, 0.0)



@pytest.mark.parametrize("ratio", [0.0, -0.5, float("nan"), 1.5, None, "0.5"])
def test_plan_refuses_a_keep_ratio_outside_0_1(ratio):
    # 0 and negative ratios kept one channel of every group without a word; NaN and > 1 with
    # scope="global" failed with a bare ValueError / IndexError
    graph = G.DependencyGraph(ResidualNet().eval(), sparse_input(n=80))
    err = TypeError if ratio is None or isinstance(ratio, str) else ValueError
    for scope in ("group", "global"):
        with pytest.raises(err, match="keep_ratio"):
            G.plan(graph, ratio, scope=scope)
    with pytest.raises(err, match=r"keep_ratio\['stem.0'\]"):
        G.plan(graph, {"stem.0": ratio})


def test_keep_ratio_1_keeps_a_group_whole_whatever_the_multiple():
    # rounding to the multiple cut a 20-channel group kept whole (ratio 1, or removing 0) to 16
    assert G.kept_count(20, 1.0, 8) == 20 and G.kept_count(12, 1.0, 8) == 12 and G.kept_count(20, 0.5, 8) == 8
    net = nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 2))
    graph = G.DependencyGraph(net, torch.randn(5, 4))
    assert [len(k) for k in G.plan(graph, 1.0, multiple=8).values()] == [20]
    from pointsparse.prune import surgery
    assert surgery.apply_channel_ratios(net, {"0": 0.0}, example_input=torch.randn(5, 4), multiple=8) == {"0": 20}
    assert net[0].out_features == 20
    with pytest.raises(TypeError, match="multiple"):
        G.kept_count(20, 0.5, True)


@pytest.mark.parametrize("make", [np.int64, np.int32])
def test_multiple_takes_numpy_integers(make):
    """kept_count's and prune_channels' multiple may be a numpy integer (it
    was refused: isinstance int), with the counts the int gives."""
    from pointsparse.prune.workflow import prune_channels
    assert G.kept_count(24, 0.5, make(16)) == G.kept_count(24, 0.5, 16) == 16
    widths = []
    for multiple in (4, make(4)):
        torch.manual_seed(0)
        net = prune_channels(nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 2)), torch.randn(5, 4), 0.5,
                             multiple=multiple)
        widths.append((net[0].out_features, net[0].weight.detach().clone()))
    assert widths[0][0] == widths[1][0] == 12 and torch.equal(widths[0][1], widths[1][1])  # (2.5 fours: a tie keeps 3)


@pytest.mark.parametrize("bad", [True, np.bool_(True), 2.0, 1.5])
def test_multiple_refuses_bools_and_floats(bad):
    from pointsparse.prune.workflow import prune_channels
    with pytest.raises(TypeError, match="multiple must be a positive int"):
        G.kept_count(20, 0.5, bad)
    with pytest.raises(TypeError, match=r"multiple \(--multiple\) must be a positive int"):
        prune_channels(nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 2)), torch.randn(5, 4), 0.5,
                       multiple=bad)


def test_plan_refuses_scores_not_shaped_like_their_tensors():
    net = ResidualNet().eval()
    graph = G.DependencyGraph(net, sparse_input(n=80))
    with pytest.raises(TypeError, match="scores must be a dict"):
        G.plan(graph, 0.5, scores=[1.0, 2.0])  # was an AttributeError
    with pytest.raises(ValueError, match=r"scores for 'weight' of 'stem.0' must be a tensor of its shape"):
        G.plan(graph, 0.5, scores={(net.stem[0], "weight"): torch.ones(3)})  # was an IndexError
    # scores of a copy of the model (keyed by its modules): said so, not only "no scores cover group"
    import copy
    with pytest.raises(ValueError, match=r"no scores cover group 'stem.0': scores are keyed by \(module, tensor "
                                         r"name\) of the model the graph was traced on.*a copy of the model"):
        G.plan(graph, 0.5, scores=criteria.bn_scaling(copy.deepcopy(net)))


def test_cut_refuses_float_indices_and_a_group_named_twice():
    net = ResidualNet().eval()
    x = sparse_input(n=80)
    graph = G.DependencyGraph(net, x)
    with pytest.raises(TypeError, match="channel indices"):
        graph.cut({"stem.0": [0.5, 1.7]})  # was truncated to channels 0 and 1
    with pytest.raises(TypeError, match="channel indices"):
        graph.cut({"stem.0": "ab"})
    with pytest.raises(ValueError, match="names group 'stem.0' twice"):  # both removals applied: 0 channels left
        graph.cut({0: [0, 1, 2, 3], "stem.0": [4, 5, 6, 7]})
    with pytest.raises(ValueError, match="names group 'stem.0' twice"):
        graph.mask({0: [0, 1, 2, 3], "stem.0": [4, 5, 6, 7]})
    with pytest.raises(TypeError, match="retrace must be True or False"):  # "no" retraced
        graph.cut({"stem.0": [0, 1]}, retrace="no")
    assert net.stem[0].out_channels == 8 and not ps.prune.is_pruned(net)
    graph.cut({"stem.0": torch.tensor([1, 3])})
    assert net.stem[0].out_channels == 2 and net(x).feats.shape == (len(x), 4)


@pytest.mark.parametrize("recorded, err", [({"stem.0": {"out": 0}}, ValueError), ({"stem.0": {"out": -1}}, ValueError),
                                           ({"stem.0": {"out": "4"}}, TypeError), ({"stem.0": 4}, TypeError),
                                           ([("stem.0", 4)], TypeError)])
def test_resize_refuses_widths_that_are_not_positive_ints(recorded, err):
    # a width of 0 made a zero-channel layer silently; -1 and "4" crashed in torch.arange / a comparison
    net = ResidualNet()
    with pytest.raises(err, match="recorded width"):
        G.resize(net, recorded)
    assert net.stem[0].out_channels == 8
    with pytest.raises(TypeError, match="torch.nn.Module"):
        G.widths("net")


@pytest.mark.parametrize("make", [np.int64, np.int32])
def test_resize_stores_numpy_widths_as_python_ints(make):
    """A recorded width read back as a numpy integer (from an array, a
    table) was stored as it came: the conv's out_channels became np.int64
    (its repr, a config written from it). It is a Python int, the layer the
    same as an int width gives."""
    net, want = ResidualNet(), ResidualNet()
    G.resize(net, {"stem.0": {"out": make(4)}})
    G.resize(want, {"stem.0": {"out": 4}})
    conv = net.stem[0]
    assert type(conv.out_channels) is int and conv.out_channels == 4
    assert repr(conv) == repr(want.stem[0]) and conv.weight.shape == want.stem[0].weight.shape
    assert G.widths(net) == G.widths(want)



def test_resize_checks_every_entry_before_changing_a_layer():
    """resize checked and applied each entry in turn: a bad entry after a
    good one left the earlier layer resized (the model half of each width).
    Now nothing changes unless every entry is good."""
    net = ResidualNet()
    before = G.widths(net)
    with pytest.raises(ValueError, match="which the model does not have"):
        G.resize(net, {"stem.0": {"out": 4}, "nowhere": {"out": 2}})
    with pytest.raises(ValueError, match="exceeds the model's"):
        G.resize(net, {"stem.0": {"out": 4}, "stem.1": {"in": 99}})
    assert G.widths(net) == before and net.stem[0].weight.shape[2] == 8

def test_resize_refuses_an_input_width_of_a_norm():
    """A norm has no input channels of its own (its width is its 'out', as
    widths() records it): resize(net, {bn: {"in": 3}}) set its num_features
    to 3 and left its 8 entries, silently (a BatchNorm(3) of weight (8,)).
    A ValueError names the entry; nothing changes."""
    net = ResidualNet()
    before = G.widths(net)
    with pytest.raises(ValueError, match=r"recorded width 3 of 'stem.1' \(in\): a BatchNorm has no 'in' channels of "
                                         r"its own \(its width is its 'out'\)"):
        G.resize(net, {"stem.0": {"out": 4}, "stem.1": {"in": 3}})
    assert G.widths(net) == before and net.stem[1].num_features == 8


# ------------------------------------------------------------- procedures
def test_procedures_reach_every_group_of_minkunet():
    from pointsparse.prune import amc, surgery
    net = MinkUNet(4, 19, cr=0.25).eval()
    x = sparse_input(n=500, channels=4, extent=16)
    assert len(surgery.channel_groups(net, x)) == 33 and len(surgery.channel_groups(net)) == 17
    infos = amc.layer_infos(net, x, coupled=True)
    assert sum(i.producer for i in infos) == 33 and all(i.out_group for i in infos if i.name != "classifier.fn")
    res = amc.amc_search(net, lambda m: 0.5, x, episodes=2, warmup=1, reward="error", target_flops=0.25,
                         coupled=True)
    assert res.flops <= 0.25 * res.dense_flops * (1 + 1e-9) and len(res.ratios) == 33
    pruned = copy.deepcopy(net)
    surgery.apply_channel_ratios(pruned, res.ratios, example_input=x)
    report = amc._compat.sparsity_report(pruned, x)["layers"]
    assert sum(r["dense_flops"] for r in report.values()) == pytest.approx(res.flops)  # the FLOPs model is exact
    assert pruned(x).feats.shape == (len(x), 19)


def test_netadapt_on_coupled_groups_and_unmeetable_budget(monkeypatch):
    from pointsparse.prune import netadapt
    torch.manual_seed(0)
    # Latency stands in as the parameter count: the search logic is tested,
    # not the machine's timing (no timed assertions in tests).
    monkeypatch.setattr(netadapt, "measure_latency",
                        lambda model, example_input, repeats=7: float(sum(p.numel() for p in model.parameters())))
    mlp = nn.Sequential(nn.Linear(64, 768), nn.ReLU(), nn.Linear(768, 768), nn.ReLU(), nn.Linear(768, 3)).eval()
    x = torch.randn(4096, 64)
    calls = []
    res = netadapt.netadapt(mlp, None, lambda m, steps: calls.append(steps), lambda m: 1.0, x, budget=0.9,
                            short_steps=1, long_steps=2, max_iterations=3)
    assert res.history and set(res.channels) == {"0", "2"} and calls[-1] == 2
    assert res.model[0].out_features == res.channels["0"] and res.model(x).shape == (4096, 3)
    net, x = ResidualNet().eval(), sparse_input(n=200, extent=10)
    with pytest.warns(RuntimeWarning, match="could not meet the latency budget"):
        res = netadapt.netadapt(net, None, lambda m, steps: None, lambda m: 1.0, x, budget=1e-6,
                                short_steps=0, long_steps=0, max_iterations=1)
    assert "max_iterations=1" in res.message


def test_group_sensitivity_scan_and_apply():
    from pointsparse.prune import sensitivity
    net, x = ResidualNet().eval(), sparse_input(n=120)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ref = net(x).feats.detach()

    def closeness(m):  # 1 for the unpruned network, lower the more a cut changes it
        return 1.0 - float((m(x).feats - ref).norm() / ref.norm())

    res = sensitivity.sensitivity_scan(net, closeness, [0.0, 0.5, 0.75], "group", example_input=x)
    assert list(res.curves) == ["stem.0", "stem.3", "block.main.0"] and res.sizes["block.main.0"] == 12
    assert all(v[0] == 1.0 and v[2] < 1.0 for v in res.curves.values())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # scanned on copies
    sensitivity.apply_ratios(net, {"stem.3": 0.5, "block.main.0": 0.0}, "group", example_input=x)
    assert net.stem[3].out_channels == 4 and net.block.main[0].in_channels == 4 and net.head.fn.in_features == 4
    with pytest.raises(ValueError, match="example_input"):
        sensitivity.sensitivity_scan(net, closeness, [0.5], "group")


@pytest.mark.parametrize("prune_fn", [
    lambda m: ps.prune.channel_structured(m, "weight", amount=2, n=1),
    lambda m: ps.prune.nm_structured(m, "weight", 1, 3),
])
def test_masked_models_deep_copy_in_any_state(prune_fn):
    net, x = ResidualNet(), sparse_input(n=120)
    prune_fn(net.stem[0])
    copy.deepcopy(net)  # right after pruning
    net.train()
    net(x).feats.sum().backward()  # after a training-mode forward and backward
    twin = copy.deepcopy(net)
    assert torch.equal(twin.stem[0].weight_mask, net.stem[0].weight_mask)
    assert net.stem[0].weight_orig.grad is not None
    net.eval()
    assert torch.equal(twin.eval()(x).feats, net(x).feats)


def _layer_groups(graph):
    """Each cuttable group as its size and the layers producing and consuming it (names aside: a group is
    named by its first producer, the order of calls decides)."""
    return sorted((g.size, tuple(sorted(n for n in g.modules("out") if adapters.is_layer(graph.module(n)))),
                   tuple(sorted(g.modules("in")))) for g in graph.groups)


def test_residual_summed_in_a_conv_store_is_coupled():
    """fuse_for_inference moves a residual block's sum into its last conv
    (``conv(h, add=shortcut(x))``): the graph followed only a layer's first
    argument, so each block's stream split in two groups (49 instead of 33)
    that plans cut apart, and the cut model summed other channels than the
    masked one, silently. The conv's ``add`` (an adapter's ``addends``) is
    coupled with its output as a sum's operands are."""
    torch.manual_seed(0)
    net = _randomize_norms(MinkUNet(4, 5, cr=0.25, blocks=1))
    x = sparse_input(n=400, channels=4, extent=16)
    fused = ps.nn.fuse_for_inference(copy.deepcopy(net))
    assert sum(1 for m in fused.modules() if getattr(m, "sum_in_conv", None) is not None) == 8
    graph = G.DependencyGraph(fused, x)
    assert _layer_groups(graph) == _layer_groups(G.DependencyGraph(net, x))
    keep = G.plan(graph, 0.5)
    graph.mask(keep)
    with torch.no_grad():
        masked = fused(x).feats
        graph.cut(keep)
        assert torch.allclose(fused(x).feats, masked, rtol=0, atol=1e-6)


class _SumInConv(nn.Module):
    """head(conv2(conv1(x), add=...)) with the addend given by keyword or by position."""

    def __init__(self, addend: str, positional: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv0, self.conv1, self.conv2 = ps.nn.Conv3d(3, 6, 1), ps.nn.Conv3d(6, 4, 3), ps.nn.Conv3d(4, 6, 3)
        self.head = ps.nn.Conv3d(6, 2, 1)
        self.addend, self.positional = addend, positional

    def forward(self, x):
        x = self.conv0(x) if self.addend == "stream" else x.with_feats(x.feats.repeat(1, 2))
        h = self.conv1(x)
        return self.head(self.conv2(h, x) if self.positional else self.conv2(h, add=x))


@pytest.mark.parametrize("positional", [False, True], ids=["keyword", "positional"])
def test_conv_addend_couples_or_fixes_its_output(positional):
    graph = G.DependencyGraph(_SumInConv("stream", positional).eval(), sparse_input(n=80))
    stream = graph.group("conv0")
    assert set(stream.modules("out")) == {"conv0", "conv2"} and set(stream.modules("in")) == {"conv1", "head"}
    # the network's input (repeated) added to conv2's output: those channels no layer produces, never cut
    graph = G.DependencyGraph(_SumInConv("input", positional).eval(), sparse_input(n=80))
    assert [g.name for g in graph.groups] == ["conv1"]
    assert any("'add' (added to its output) has channels no layer produces" in g.fixed
               for g in graph.fixed_groups if "conv2" in g.modules("out"))


class _Mix(nn.Linear):
    """A Linear (its adapter) that also takes ``skip`` and sums it into its input: an argument the graph does
    not know."""

    def forward(self, x, skip):
        return super().forward(x + skip)


class _MixNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pre, self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 6), nn.Linear(8, 6)
        self.mix, self.head = _Mix(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(self.pre(x))
        return self.head(torch.relu(self.mix(self.a(h), skip=self.b(h))))


def test_channels_passed_as_another_argument_are_fixed():
    """Only a layer's first argument was followed: b's channels (summed with
    a's inside mix) formed a group of their own, cut apart from a's (the
    same count at one keep ratio: mix summed other channels, silently).
    Every channel such a call touches is now fixed."""
    net = _MixNet().eval()
    graph = G.DependencyGraph(net, torch.randn(16, 3))
    assert [g.name for g in graph.groups] == ["pre"]
    reasons = {g.name: g.fixed for g in graph.fixed_groups}
    assert "passed as its argument 'skip'" in reasons["a"] and "passed as its argument 'skip'" in reasons["b"]
    assert "passed as its argument 'skip'" in reasons["mix"]
    keep = G.plan(graph, 0.5, multiple=1)
    graph.mask(keep)
    masked = net(torch.ones(4, 3))
    graph.cut(keep)
    assert torch.allclose(net(torch.ones(4, 3)), masked, atol=1e-6)


class _Widened(nn.Module):
    """A layer with parameters and no adapter given a number: what it makes of it happens where the graph does
    not look."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(1))

    def forward(self, t, width):
        return t.new_zeros(t.shape[0], width) * self.s


class _WidthNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.widened, self.b = nn.Linear(4, 6), _Widened(), nn.Linear(12, 2)

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.cat([y, self.widened(x, width=y.shape[1])], 1))


def test_a_width_passed_to_a_layer_fixes_its_channels():
    """``widened(x, width=y.shape[1])`` makes a tensor as wide as y inside a
    layer, where the graph does not look: a was cut, and that tensor with
    it, while b was left as wide as before (the cut model failed: 5x10 and
    12x2). The channels of a width passed to a layer are fixed."""
    net, x = _WidthNet().eval(), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == []
    assert "widened" in {g.name: g.fixed for g in graph.fixed_groups}["a"]
    assert _cut_mismatches(net, x) == []


class _Scaled(nn.Module):
    """A layer with parameters and no adapter given a scale: what it makes of it happens where the graph does not
    look."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(1))

    def forward(self, t, scale):
        return t * scale * self.s


class _ScaleNet(nn.Module):
    def __init__(self, scale):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.scaled, self.b, self.scale = nn.Linear(4, 6), _Scaled(), nn.Linear(10, 2), scale

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.cat([y, self.scaled(x, self.scale(y.shape[1]))], 1))


@pytest.mark.parametrize("scale", [lambda c: 1.0 / c, lambda c: int(c)], ids=["reciprocal", "int"])
def test_a_number_of_a_width_passed_to_a_layer_as_a_plain_one_fixes_its_channels(scale):
    """``scaled(x, 1.0 / y.shape[1])``: a float on the left divides in
    float's own code, and int() makes a plain int, so the layer was given a
    plain number, which the graph took for a constant: a was cut, and the
    layer scaled by the cut width (another output). A number equal to the
    reciprocal of a width read off channels, or to a width turned into an
    int, passed to a layer fixes the channels, as it does passed to an op."""
    net, x = _ScaleNet(scale).eval(), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == []
    assert _cut_mismatches(net, x) == []


class _KeepsWidth(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.kept = nn.Linear(4, 6), nn.Linear(6, 2), None

    def forward(self, x):
        y = self.a(x)
        if self.kept is None:
            self.kept = y.shape[1]  # (the width itself while tracing: it knows a's channels)
        return self.b(y)


def test_a_width_kept_past_its_trace_fixes_nothing_of_the_graph_it_built():
    """A width a module keeps in an attribute fixes its channels where a
    float is made of it while its trace runs; made after it (float(c), c *
    0.5, 1.0 / c), it fixes nothing of the graph it built: a stays cuttable."""
    net, x = _KeepsWidth().eval(), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == ["a"] and graph.spaces.fixed.count(None) > 0
    fixed = list(graph.spaces.fixed)
    assert type(net.kept) is not int and net.kept == 6
    assert (float(net.kept), net.kept * 0.5, 2 / net.kept, math.sqrt(net.kept)) == (6.0, 3.0, 1 / 3, math.sqrt(6))
    assert graph.spaces.fixed == fixed and [g.name for g in graph.groups] == ["a"]


def test_global_plan_normalises_groups_of_small_scores():
    """scope="global" divides each group's scores by their mean, which was
    clamped to 1e-12: a group of scores ~1e-15 (a Taylor criterion near a
    minimum) kept 1 of its 8 channels and the other group all 8 at keep 0.5;
    the scale of a group's scores must not matter. NaN scores are named
    (topk ranked them above every number: always kept)."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    graph = G.DependencyGraph(net, torch.randn(5, 4))
    ramp = torch.arange(1.0, 9.0)
    for tiny in (1e-15, 1e-6, 1.0):  # group '0' scored by net[0]'s rows, group '2' by net[4]'s columns
        scores = {(net[0], "weight"): (tiny * ramp)[:, None].expand(8, 4).clone(),
                  (net[4], "weight"): ramp[None, :].expand(2, 8).clone()}
        keep = G.plan(graph, 0.5, scores=scores, scope="global", multiple=1)
        assert {k: v.tolist() for k, v in keep.items()} == {"0": [4, 5, 6, 7], "2": [4, 5, 6, 7]}, tiny
    scores[(net[0], "weight")][3, 1] = float("nan")
    with pytest.raises(ValueError, match="scores for 'weight' of '0' hold NaN"):
        G.plan(graph, 0.5, scores=scores)


def test_global_plan_keeps_the_ratio_when_scores_tie():
    """scope="global" kept every channel scoring at least the k-th best, so
    tied scores kept them all: BatchNorm scales as initialised (every gamma
    1) under plan(graph, 0.5, bn_scaling(net), "global") cut nothing, and a
    tie across the threshold kept extra channels. Exactly the best
    round(keep_ratio * channels) of all groups are kept now (a tie shared
    among the groups in proportion to their sizes)."""
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                        nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    graph = G.DependencyGraph(net, torch.randn(1, 3, 12, 12))
    keep = G.plan(graph, 0.5, scores=criteria.bn_scaling(net), scope="global", multiple=1)
    assert sum(len(v) for v in keep.values()) == 16
    assert {k: len(v) for k, v in keep.items()} == {"0": 8, "3": 8}  # (relative scores: every one 1.0)
    with torch.no_grad():  # a tie across the threshold: 3 of 32 at keep 0.1 (two best, then group 3's 16 tied)
        net[1].weight.fill_(0.5)
        net[1].weight[:2] = 2.0
        net[4].weight.fill_(0.25)
    keep = G.plan(graph, 0.1, scores=criteria.bn_scaling(net), scope="global", multiple=1)
    assert sum(len(v) for v in keep.values()) == 3 and keep["0"][:2].tolist() == [0, 1]


def test_group_scores_of_a_kernel_region_conv_count_its_region():
    """The default scores (absolute weights) and given ones summed a
    kernel_region conv's values outside the region too (never run); only
    the region's offsets count."""
    from pointsparse.nn.functional import region_of

    net = nn.Sequential(ps.nn.Conv3d(2, 4, 3, kernel_region="cross"), ps.nn.ReLU(),
                        ps.nn.Conv3d(4, 3, 3, kernel_region="cross")).eval()
    keep = region_of(3, "cross")
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[keep] = torch.tensor([1.0, 2.0, 3.0, 4.0])
        net[0].weight[0] = torch.tensor([100.0, 100.0, 0.0, 0.0])  # offset 0 is outside the cross
        net[2].weight.zero_()
        net[2].weight[26, :2] = 50.0  # outside too, on input channels 0 and 1
    graph = G.DependencyGraph(net, sparse_input(channels=2))
    assert G.group_scores(graph, "0").tolist() == [14.0, 28.0, 42.0, 56.0]
    assert G.plan(graph, 0.5, multiple=1)["0"].tolist() == [2, 3]
    ones = {(net[0], "weight"): torch.ones(27, 2, 4)}
    assert G.group_scores(graph, "0", ones).tolist() == [14.0] * 4


def test_group_takes_a_numpy_integer_index():
    """group(i) with a numpy integer is the group at that index (it was
    looked up as a name: 'np.int64(0) names no cuttable channel group')."""
    graph = G.DependencyGraph(nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 2)), torch.randn(5, 4))
    assert graph.group(np.int64(0)) is graph.group(0) is graph.groups[0]
    assert graph.group(np.int32(-1)) is graph.groups[-1]
    for bad in (True, 0.0):
        with pytest.raises(ValueError, match="names no cuttable channel group"):
            graph.group(bad)


def test_masked_channels_of_a_kernel_region_conv_look_inside_its_region():
    """A kernel_region conv's channel whose weights (its region's) are all
    zero is dead, whatever the offsets outside the region hold (never run):
    nonzero values there kept it 'alive', so remove_masked left it in. The
    cut model computes what the masked one computes."""
    net, x = region_chain(0, 1e-3).eval(), sparse_input()
    region = list(net[0].kernel_region)
    with torch.no_grad():
        net[0].weight[region, :, 1] = 0  # channel 1 is dead; the values outside its region are not
    ref = net(x).feats
    graph = G.DependencyGraph(net, x)
    assert {k: v.tolist() for k, v in graph.masked_channels().items()} == {"0": [1]}
    assert graph.remove_masked() == {"0": 1}
    assert net[0].out_channels == 5 and net[2].in_channels == 5
    assert torch.allclose(net(x).feats, ref, atol=1e-5, rtol=1e-5)


def test_cut_slices_an_attached_filter_skeleton():
    """A channel cut of convs with filter skeletons attached
    (prune.attach_filter_skeleton: weight = weight_orig * mask * skeleton,
    the skeleton (K, 1, C_out)): the skeletons are cut on their output
    channels along with the weights (the retrace once failed in torch's
    broadcast of the old skeleton), and the cut model computes what a cut
    of the same model with the skeletons folded in first does."""
    from pointsparse import nn as spnn, prune

    torch.manual_seed(0)
    net = nn.Sequential(spnn.Conv3d(4, 16, bias=True), spnn.BatchNorm(16), spnn.ReLU(),
                        spnn.Conv3d(16, 16), spnn.BatchNorm(16), spnn.ReLU(), spnn.Conv3d(16, 5))
    _randomize_norms(net).eval()
    for conv in (net[0], net[3], net[6]):
        skeleton = prune.attach_filter_skeleton(conv)
        with torch.no_grad():
            skeleton.uniform_(0.2, 2.0)
    x = sparse_input(n=300, channels=4)
    with torch.no_grad():  # (the weights the hooks compute are then leaves, which deepcopy takes)
        net(x)
    folded = copy.deepcopy(net)
    for conv in (folded[0], folded[3], folded[6]):
        prune.detach_filter_skeleton(conv)
    keep = G.plan(G.DependencyGraph(folded, x), 0.5)
    G.DependencyGraph(folded, x).cut(keep)
    G.DependencyGraph(net, x).cut(keep)
    assert net[0].weight_skeleton.shape == (27, 1, net[0].out_channels) and net[0].out_channels < 16
    with torch.no_grad():
        torch.testing.assert_close(net(x).feats, folded(x).feats, rtol=1e-5, atol=1e-5)


def test_remove_masked_folds_through_a_consumers_filter_skeleton():
    """remove_masked folds the constant a masked channel carries after its
    BatchNorm into the bias of a per-site consumer, through the weight the
    consumer computes with: with a filter skeleton attached that is
    weight_orig * mask * skeleton (the skeleton was once left out of the
    fold, and the smaller model computed other values)."""
    from pointsparse import nn as spnn, prune

    torch.manual_seed(0)
    net = nn.Sequential(spnn.Conv3d(4, 8), spnn.BatchNorm(8), spnn.ReLU(), spnn.Conv3d(8, 5, 1, bias=True))
    _randomize_norms(net).eval()
    with torch.no_grad():
        net[1].bias.abs_().add_(0.5)  # every channel's shift survives the ReLU
    skeleton = prune.attach_filter_skeleton(net[3])
    with torch.no_grad():
        skeleton.uniform_(0.2, 2.0)
    mask = torch.ones_like(net[0].weight, dtype=torch.bool)
    mask[:, :, [1, 5]] = False
    prune.custom_from_mask(net[0], "weight", mask)
    x = sparse_input(n=300, channels=4)
    with torch.no_grad():
        ref = net(x).feats
    assert sum(G.DependencyGraph(net, x).remove_masked().values()) == 2
    assert net[0].out_channels == 6
    with torch.no_grad():
        torch.testing.assert_close(net(x).feats, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("consumer, per_site", [
    (dict(kernel_size=3, kernel_region=[13]), True),  # the centre offset only: a 1x1x1 conv in effect
    (dict(kernel_size=2, kernel_region=[0]), True),  # (a k2's zero offset is its first)
    (dict(kernel_size=3, dilation=2, kernel_region=[13]), True),
    (dict(kernel_size=1), True),
    (dict(kernel_size=3, kernel_region=[0]), False),  # one offset, not the centre: some sites have no pair
    (dict(kernel_size=3, stride=2, kernel_region=[13]), False),  # strided: an output need not sit on an input
    (dict(kernel_size=1, stride=2), False),
])
def test_remove_masked_folds_into_a_conv_that_runs_one_offset_per_site(consumer, per_site):
    """A sparse conv is linear per site (a masked channel's constant folds
    into its bias) when it runs only the zero offset at stride 1: a
    kernel_region conv of the centre offset was judged by its kernel (27
    offsets: refused), a k1 stride-2 conv was folded although the outputs
    that sit on no input get no pair (another result than the masked
    model's). The fold counts the region's weights only (the values outside,
    never run, are nonzero here)."""
    from pointsparse import nn as spnn, prune

    torch.manual_seed(0)
    net = nn.Sequential(spnn.Conv3d(4, 8), spnn.BatchNorm(8), spnn.ReLU(), spnn.Conv3d(8, 5, bias=True, **consumer))
    _randomize_norms(net).eval()
    with torch.no_grad():
        net[1].bias.abs_().add_(0.5)  # every channel's shift survives the ReLU
        net[3].weight.add_(0.5)  # (outside a region too)
    assert adapters.adapter_for(net[3]).per_site(net[3]) is per_site
    mask = torch.ones_like(net[0].weight, dtype=torch.bool)
    mask[:, :, [1, 5]] = False
    prune.custom_from_mask(net[0], "weight", mask)
    x = sparse_input(n=300, channels=4)
    with torch.no_grad():
        ref = net(x).feats
    graph = G.DependencyGraph(net, x)
    if not per_site:
        with pytest.raises(ValueError, match="cannot be folded exactly"):
            graph.remove_masked()
        return
    assert sum(graph.remove_masked().values()) == 2
    assert net[0].out_channels == 6
    with torch.no_grad():
        torch.testing.assert_close(net(x).feats, ref, rtol=1e-5, atol=1e-5)


def test_a_magnitude_voxel_score_leaves_the_channels_it_reads_cuttable():
    """A magnitude VoxelSkip or VoxelPrune ranks the voxels by their feats'
    L2 norm, a reduction over channels that a zero (masked) channel adds
    nothing to, so the cut of masked channels leaves it as it was: MinkUNet
    with them has the groups of MinkUNet without them (the norm fixed every
    group feeding a pruned stage, "mixed by linalg_vector_norm"). A mean
    over channels, or a norm of negative order, which a zero channel
    changes, still fixes the channels."""
    from pointsparse.models import add_voxel_prune

    net, x = MinkUNet(4, 5, cr=0.25, blocks=1), sparse_input(n=400, channels=4, extent=16)
    plain = len(G.DependencyGraph(net, x).groups)
    for j in (0, 1):
        net.fuse[j][0].main = ps.nn.VoxelSkip(net.fuse[j][0].main, 0.5)
    add_voxel_prune(net, "fuse.2", 0.5)
    graph = G.DependencyGraph(net, x)
    assert len(graph.groups) == plain and [g.fixed for g in graph.fixed_groups] == ["network output"]
    assert G.Member("fuse.0.0.main.module.0", "in", 0, 64, 0) in graph.group("up.0.0").members
    keep = G.plan(graph, 0.5)
    graph.mask(keep)
    with torch.no_grad():
        masked = net.eval()(x).feats
        graph.cut(keep)
        assert float((net(x).feats - masked).norm() / masked.norm()) <= 1e-5  # the same voxels kept

    class Scaled(nn.Module):
        def __init__(self, reduce):
            super().__init__()
            self.a, self.b, self.reduce = nn.Linear(4, 6), nn.Linear(6, 2), reduce

        def forward(self, t):
            y = self.a(t)
            return self.b(y * self.reduce(y))

    for reduce, cuttable in ((lambda y: torch.linalg.vector_norm(y, dim=1, keepdim=True), True),
                             (lambda y: y.norm(2, 1, True), True), (lambda y: y.norm(2, 0), True),
                             (lambda y: y.mean(1, keepdim=True), False), (lambda y: y.norm(-2, 1, True), False),
                             (lambda y: torch.linalg.vector_norm(y, -1, 1, True), False)):
        graph = G.DependencyGraph(Scaled(reduce), torch.randn(5, 4))
        assert [g.name for g in graph.groups] == (["a"] if cuttable else []), graph.fixed_groups


@pytest.mark.parametrize("along, cuttable", [
    (lambda y: y * y.roll(2, 1), False),  # (roll's second argument is its shifts: it read axis 0)
    (lambda y: y * y.roll(2, 0), True),
    (lambda y: y * torch.roll(y, 1, dims=1), False),
    (lambda y: y * y.renorm(2, 0, 1.0), False),  # each row renormed over its channels (p read as the dim)
    (lambda y: y * torch.nn.functional.normalize(y, 2.0), False),  # (normalize's dim is 1 when none is given)
    (lambda y: y * torch.nn.functional.normalize(y, 2.0, 0), True),
    (lambda y: y.cumsum(0), True),
    (lambda y: y * y.sort(1)[0], False),
    (lambda y: torch.cat(y.split(3, 1)[::-1], 1), False),  # (split's second argument is its size)
    (lambda y: torch.cat(y.split(2, 0), 0), True),
    (lambda y: y * y.topk(6, 1)[0].flip(1), False),
])
def test_ops_along_a_dim_read_it_where_it_comes_after_another_argument(along, cuttable):
    """split, topk, roll, renorm, normalize, diff... take their dim after
    another argument (a size, a count, shifts, p); the graph read that
    argument as the dim, so roll(y, 2, 1) (shifts 2: axis 0 of 2) or
    renorm(y, 2, 0, max) (p 2) left channels they mix cuttable: masked
    channels then moved into kept ones (other outputs after the cut)."""

    class Along(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, t):
            return self.b(along(self.a(t)))

    graph = G.DependencyGraph(Along(), torch.randn(5, 4))
    assert [g.name for g in graph.groups] == (["a"] if cuttable else []), graph.fixed_groups


def _zero_consumers(net, group, dropped):
    """Zero the inputs of ``dropped`` channels of ``group`` on every layer
    that reads them: with the producers masked, the model computes what the
    cut one does wherever the graph is right, whatever an op between makes
    of a zero (a softmax over rows, a sigmoid)."""
    for m in group.members:
        if m.role == "in":
            module = net.get_submodule(m.module)
            for tensor, roles in adapters.adapter_for(module).axes(module).items():
                if "in" in roles:
                    with torch.no_grad():
                        adapters.raw(module, tensor).index_fill_(roles["in"], m.positions(dropped), 0.0)


def _cut_mismatches(net, x, consumers=False) -> list[str]:
    """For every cuttable group and two keeps (all but channel 1, all but 0
    and size - 2): mask (``consumers``: and zero the layers reading the
    dropped channels), record the output, cut, compare. What differs."""
    out = []
    for g in G.DependencyGraph(net, x).groups:
        for drop in ([1], [0, g.size - 2])[:1 if g.size < 4 else 2]:
            if g.size < 2:
                continue
            keep = [i for i in range(g.size) if i not in drop]
            m = copy.deepcopy(net)
            graph = G.DependencyGraph(m, x)
            graph.mask({g.name: keep})
            if consumers:
                _zero_consumers(m, graph.group(g.name), torch.tensor(drop))
            with torch.no_grad():
                masked = m(x)
                try:
                    graph.cut({g.name: keep}, retrace=False)
                    cut = m(x)
                except RuntimeError as e:  # (shapes that no longer fit)
                    out.append(f"group {g.name!r} without {drop}: the cut model fails: {e}")
                    continue
            if cut.shape != masked.shape or not torch.allclose(cut, masked, rtol=1e-5, atol=1e-5):
                out.append(f"group {g.name!r} without {drop}: the cut model's output differs from the masked one's")
    return out


class _Between(nn.Module):
    """``a = Linear(4, 6) -> op -> b = Linear(width op leaves, 2)``."""

    def __init__(self, op, rows=5):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.op = nn.Linear(4, 6), op
        with torch.no_grad():
            self.b = nn.Linear(op(self.a(torch.randn(rows, 4))).shape[-1], 2)

    def forward(self, t):
        return self.b(self.op(self.a(t)))


@pytest.mark.parametrize("move", [
    lambda y: y.t().relu().t(),
    lambda y: torch.transpose(y, 0, 1).relu().transpose(-1, -2),
    lambda y: y.permute(1, 0).relu().permute(1, 0),
    lambda y: y.movedim(1, 0).relu().movedim(0, -1),
    lambda y: torch.swapaxes(y, 0, 1).relu().swapdims(1, 0),
])
def test_channels_moved_by_a_transpose_stay_cuttable(move):
    """A transpose or permute moves the channels to another axis, where the
    graph follows them (it probes the op with the call's own arguments);
    the rule named an undefined ``func``, so each transpose fixed the
    channels it moved ("name 'func' is not defined")."""
    net, x = _Between(move), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == ["a"], graph.fixed_groups
    assert _cut_mismatches(net, x) == []


@pytest.mark.parametrize("stat", [
    lambda y: y.std(0, True),  # (unbiased, then keepdim: the third argument is no keepdim)
    lambda y: torch.var(y, 0, False),
    lambda y: torch.var_mean(y, 0, True)[0],
    lambda y: torch.std_mean(y, 0, True, True)[1],
    lambda y: y.std(0, True, True),
])
def test_std_and_var_over_rows_keep_their_channels_whatever_unbiased_says(stat):
    """``std(x, dim, unbiased, keepdim)``: the graph took ``unbiased`` for
    keepdim, placed the channels on an axis the result does not have and
    dropped them, so the Linear after it was left whole while the one
    before was cut (the cut model failed: 1x5 and 6x2)."""
    net, x = _Between(stat), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == ["a"] and graph.group("a").modules("in") == ["b"]
    assert _cut_mismatches(net, x) == []


@pytest.mark.parametrize("along, cuttable", [
    (lambda y: torch.nn.functional.softmin(y, 1), False),
    (lambda y: nn.Softmin(dim=-1)(y), False),
    (lambda y: y * torch.nn.functional.softmin(y, 0), True),
    (lambda y: torch.special.softmax(y, 1), False),
    (lambda y: torch.special.log_softmax(y, -1), False),
    (lambda y: torch.fft.fft(y, dim=1).real, False),
    (lambda y: torch.fft.fft(y).real, False),  # (along the last axis where none is given)
    (lambda y: torch.fft.fft(y, None, 0).real, True),
    (lambda y: torch.fft.rfft(y, dim=0).real, True),
    (lambda y: torch.fft.fft2(y).real, False),
    (lambda y: torch.fft.fftn(y, dim=(0,)).imag, True),
    (lambda y: torch.fft.fftshift(y, 1), False),
    (lambda y: torch.fft.fftshift(y), False),
    (lambda y: torch.fft.ifftshift(y, dim=0), True),
])
def test_softmin_special_softmax_and_ffts_read_their_dim(along, cuttable):
    """softmin, torch.special's softmax and log_softmax and the torch.fft
    ops mix the entries along their dim; the graph did not know their
    names and passed the channels on as through an activation, so masked
    channels moved into kept ones when they ran over channels."""
    net, x = _Between(along), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == (["a"] if cuttable else []), graph.fixed_groups
    assert _cut_mismatches(net, x) == []


@pytest.mark.parametrize("op, cuttable", [
    (lambda y: torch.fliplr(y), False),  # (axis 1: the channels of (N, C))
    (lambda y: y.flipud(), True),
    (lambda y: torch.msort(y), True),
    (lambda y: torch.msort(y.t()).t(), False),
    (lambda y: torch.rot90(y, 2), False),
    (lambda y: torch.triu(y), False),  # (zeroes by column: a channel's position, which the cut changes)
    (lambda y: y.tril(-1), False),
    (lambda y: torch.triu(y[None])[0], False),
    (lambda y: torch.triu(y.t()[..., None])[..., 0].t(), True),  # (over rows and a new axis: the channels first)
    (lambda y: torch.nn.functional.avg_pool1d(y, 3, 1, 1), False),  # (a (C, L) input: pooled along the channels)
    (lambda y: torch.nn.functional.max_pool1d(y, 3, 1, 1), False),
    (lambda y: torch.nn.functional.avg_pool1d(y.t(), 3, 1, 1).t(), True),
    (lambda y: torch.nn.functional.max_pool1d(y.t(), 3, 1, 1).t(), True),
    (lambda y: torch.nn.functional.interpolate(y.t()[None], scale_factor=2)[0].t(), True),
])
def test_ops_on_axes_their_name_implies_hold_channels_there(op, cuttable):
    """fliplr, flipud, msort, rot90, triu / tril and pooling act on axes
    their name (or the input's rank) implies, not on a dim argument: the
    graph took them for element-wise ops, so fliplr(y) or avg_pool1d on
    ``(N, C)`` feats left the channels they mix cuttable."""
    net, x = _Between(op), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == (["a"] if cuttable else []), graph.fixed_groups
    assert _cut_mismatches(net, x) == []


@pytest.mark.parametrize("mix", [
    lambda y: torch.nn.functional.rms_norm(y, y.shape[-1:]),
    lambda y: torch.nn.functional.local_response_norm(y[..., None], 3, alpha=1.0)[..., 0],
    lambda y: torch.nn.functional.channel_shuffle(y[..., None], 2)[..., 0],
    lambda y: nn.ChannelShuffle(3)(y[..., None])[..., 0],
    lambda y: torch.cdist(y.t(), y.t()).t(),  # (rows: the channels, compared over the points)
    lambda y: torch.take(y, torch.arange(6)),  # (flat positions: row 0's channels)
    lambda y: torch.diag_embed(y)[:, 1],
])
def test_ops_that_mix_channels_by_name_fix_them(mix):
    """rms_norm, local_response_norm (over neighbouring channels),
    channel_shuffle, cdist, take (flat positions) and diag_embed mix or
    place channels by position; unknown by name, they passed the channels
    on as an activation does."""
    net, x = _Between(mix), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert graph.groups == [] and "mixed by" in graph.fixed_groups[0].fixed, graph.groups


_EVERY_OTHER = torch.tensor([True, False, True, True, False, True])


@pytest.mark.parametrize("op, cuttable", [
    (lambda y: y.masked_fill(_EVERY_OTHER, 0.0), False),  # (a mask of 6 channels: 5 after the cut)
    (lambda y: y.masked_fill(torch.arange(y.shape[1]) % 2 == 0, 0.0), False),  # (by position)
    (lambda y: torch.where(_EVERY_OTHER, y, 0.0), False),
    (lambda y: y * torch.arange(y.shape[1]), False),
    (lambda y: y.masked_fill(y < 0, 0.0), True),
    (lambda y: y.masked_fill(torch.arange(y.shape[0])[:, None] == 0, 0.0), True),  # (rows)
    (lambda y: torch.where(y > 0, y, 0.0), True),
    (lambda y: torch.zeros_like(y).scatter_add(0, torch.zeros(5, 1, dtype=torch.long).expand(-1, y.shape[1]), y), True),
])
def test_masks_and_integers_along_the_channels_fix_them(op, cuttable):
    """An operand with entries along the channels that no layer produces
    fixes them: the graph looked only at float operands, so a bool mask of
    channels (masked_fill, where) or an integer tensor left them cuttable:
    the cut model masked other channels than the masked one (or failed: a
    mask of 6 channels on 5). An index along the rows (scatter_add's) is no
    such operand."""
    net, x = _Between(op), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == (["a"] if cuttable else []), graph.fixed_groups
    assert _cut_mismatches(net, x) == []


def _written(y, index, value, into=None):
    z = y.clone() if into is None else into(y)
    z[index] = value
    return z


@pytest.mark.parametrize("op, cuttable", [
    (lambda y: _written(y, (slice(None), 1), 0.0), False),  # (channel 1: another channel after the cut)
    (lambda y: _written(y, (slice(None), slice(1, 3)), 0.0), False),
    (lambda y: _written(y, (Ellipsis, _EVERY_OTHER), 0.0), False),
    (lambda y: _written(y, (Ellipsis, -1), torch.ones(5)), False),
    (lambda y: y.clone().index_put_((torch.tensor([0]), torch.tensor([1])), torch.tensor(0.0)), False),
    (lambda y: _written(y, 0, 0.0), True),
    (lambda y: _written(y, (slice(1, 3), slice(None)), y[:2] * 2), True),
    (lambda y: _written(y, y < 0, 0.0), True),
    (lambda y: y.clone().index_put_((torch.tensor([0, 2]),), torch.tensor(0.0)), True),
    (lambda y: _written(y, slice(None), y, into=lambda y: torch.zeros(5, 6)), False),  # (not followed)
    (lambda y: _written(y, slice(None), y, into=lambda y: torch.zeros(5, y.shape[1])), True),  # (as wide as y)
])
def test_writes_into_channel_positions_fix_them(op, cuttable):
    """``z[:, 1] = 0`` writes into channel positions, which the cut moves;
    the write returns nothing, so the graph never saw it and left the
    channels cuttable (the cut model zeroed another channel than the masked
    one). A write into rows, or by a mask of the channels' own values, is
    channel-wise; channels written into a tensor the graph does not follow
    are fixed (the layer after it was left whole)."""
    net, x = _Between(op), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == (["a"] if cuttable else []), graph.fixed_groups
    assert _cut_mismatches(net, x) == []


@pytest.mark.parametrize("op", [
    lambda y: torch.cat([y, torch.zeros_like(y)], 1),
    lambda y: torch.cat([torch.empty_like(y).fill_(0.0), y], -1),
    lambda y: _written(y[1:3], slice(None), y[1:3], into=torch.zeros_like)[1:3],
    lambda y: torch.cat([y, y.new_zeros(5, 3)], 1),  # (a width of its own: 3 channels no layer changes)
    lambda y: torch.cat([y, torch.zeros_like(input=y)], 1),  # (its tensor by keyword)
])
def test_a_tensor_like_another_has_its_channels(op):
    """``zeros_like(y)`` is as wide as ``y`` after the cut too; the graph
    took it for a constant of any layout, so the half of ``cat([y,
    zeros_like(y)], 1)`` that it fills was left whole in the next layer
    (the cut model failed: 10 channels where the Linear took 11)."""
    net, x = _Between(op), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == ["a"], graph.fixed_groups
    assert _cut_mismatches(net, x) == []


@pytest.mark.parametrize("op, cuttable", [
    (lambda y: y[:, 1:4], False),  # (channels 1..3; after the cut of channel 2: 1, 3, 4)
    (lambda y: y[..., :3], False),
    (lambda y: y[:, -2:], False),
    (lambda y: torch.cat([y, y], 1)[:, 3:9], False),
    (lambda y: y[:, :], True),
    (lambda y: y[1:, :6], True),
    (lambda y: torch.cat([y, y], 1)[:, y.shape[1]:], True),  # (the second stretch whole, at a bound that follows)
])
def test_a_slice_of_some_channels_of_a_layer_fixes_them(op, cuttable):
    """A slice of some channels of one layer holds other channels once the
    cut removes some before or inside it (its bounds stay); the graph
    followed it as those channels, so the cut model failed or read other
    channels. A slice of whole stretches (the parts of a concatenation)
    is still followed."""
    net, x = _Between(op), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == (["a"] if cuttable else []), graph.fixed_groups
    assert _cut_mismatches(net, x) == []


_ROWS = torch.randn(2, 6)


@pytest.mark.parametrize("op, cuttable", [
    (lambda y: torch.cat([y, _ROWS], 0), False),  # (rows of 6 channels no layer produces: 6 after the cut too)
    (lambda y: torch.cat((_ROWS, y), dim=-2), False),
    (lambda y: torch.cat([y, y[:2].flip(0)], 0), True),
    (lambda y: torch.cat([y, torch.ones(5, 1)], 1), True),  # (along the channels: a column of its own)
])
def test_rows_stacked_with_rows_of_unknown_channels_fix_them(op, cuttable):
    """cat along the rows with a tensor whose channels no layer produces (a
    buffer, the input): the graph left them cuttable, and the cut model
    failed (5 channels against the buffer's 6)."""
    net, x = _Between(op), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == (["a"] if cuttable else []), graph.fixed_groups
    assert _cut_mismatches(net, x) == []


@pytest.mark.parametrize("op, cuttable", [
    (lambda y: torch.quantile(y, 0.5, dim=1), False),  # (over the channels: 6 rows left, where 6 channels were)
    (lambda y: torch.nanmedian(y, 1)[0], False),
    (lambda y: torch.nn.functional.cosine_similarity(y, y.flip(0), dim=1), False),
    (lambda y: (y.unsqueeze(-1) * torch.ones(6)).select(2, 0).t().relu().t(), True),  # (a dim after the channels)
    (lambda y: torch.nanmedian(y, 0)[0], True),
    (lambda y: torch.linalg.norm(y, dim=0), True),
    (lambda y: torch.linalg.norm(y, dim=1), True),  # (a norm over the channels: a zero channel adds nothing)
    (lambda y: y * torch.linalg.norm(y, -1, 1, True), False),
])
def test_an_op_that_drops_an_axis_is_not_taken_for_an_element_wise_one(op, cuttable):
    """Ops the graph does not know are taken for element-wise ones, whose
    channels sit where broadcasting puts them; an op that drops an axis
    (quantile, nanmedian or cosine_similarity over the channels of a
    (6, 6) tensor) left its rows taken for the channels, and the layer
    reading them was cut (the cut model failed). Such an op now fixes them;
    select, unbind, kthvalue... along a dim after the channels leave them
    where they are; nanmedian is a reduction, linalg.norm a norm."""
    net, x = _Between(op, rows=6), torch.randn(6, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == (["a"] if cuttable else []), graph.fixed_groups
    assert _cut_mismatches(net, x) == []


@pytest.mark.parametrize("op, rows, cuttable", [
    (lambda y: y.T, 6, False),  # (the channels on the rows' axis, which the Linear after does not read)
    (lambda y: y.mT, 6, False),
    (lambda y: y.H, 6, False),
    (lambda y: y.T.relu().T, 5, True),
    (lambda y: y.mT.relu().mH, 5, True),
])
def test_transposing_properties_move_the_channels(op, rows, cuttable):
    """``y.T``, ``mT``, ``H``, ``mH`` are properties: the op seen is their
    ``__get__``, which the graph took for an element-wise op named "get",
    so on a square tensor the channels stayed on their axis while the rows
    came there (the cut model failed), and ``y.T.relu().T`` fixed them."""
    net, x = _Between(op, rows), torch.randn(rows, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == (["a"] if cuttable else []), graph.fixed_groups
    assert _cut_mismatches(net, x) == []


@pytest.mark.parametrize("op, cuttable", [
    (lambda y: torch.nn.functional.pad(y, (1, -1)), False),  # (every channel one position on: as wide as before)
    (lambda y: torch.nn.functional.pad(y, pad=(-1, 1), mode="constant"), False),
    (lambda y: torch.as_strided(y, y.shape, (1, 5)), False),
    (lambda y: torch.nn.functional.pad(y, (0, 0, 1, -1)), True),  # (rows)
    (lambda y: torch.nn.functional.pad(y.t(), (1, -1)).t(), True),
])
def test_pads_and_strided_views_that_shift_channels_fix_them(op, cuttable):
    """A pad of -1 on one side and 1 on the other shifts the channels by a
    position at the same width, and as_strided reads them by position: the
    graph took both for element-wise ops and left the channels cuttable."""
    net, x = _Between(op), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == (["a"] if cuttable else []), graph.fixed_groups
    assert _cut_mismatches(net, x) == []


@pytest.mark.parametrize("op, cuttable", [
    (lambda y: y.masked_scatter(y > 0, -y), False),
    (lambda y: torch.zeros_like(y).masked_scatter(y < 0, y.flip(0)), False),
    (lambda y: y.masked_fill(y > 0, 0.0), True),
])
def test_masked_scatter_reads_its_source_in_flat_order(op, cuttable):
    """masked_scatter fills the masked places with the source's entries in
    flat order, so its k-th masked place takes entry k counting every
    channel; the graph took it for an element-wise op."""
    net, x = _Between(op), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == (["a"] if cuttable else []), graph.fixed_groups
    assert _cut_mismatches(net, x) == []


# ------------------------------------------------------------------ every op between two layers
# Each case puts one op, in one of its argument forms, between a producer and a consumer, on three layouts: (N, C)
# rows of a Linear, (B, C, L) of a Conv1d (channels on axis 1 of 3), (B, L, C) of a Linear (channels last of 3).
# For every group the graph calls cuttable, the model cut computes what the masked one does; "cut" / "fix" say
# what the graph must make of the producer's channels where it is sure (None: either; a conservative fix is no
# error). zero=False: the op makes something else than 0 of a masked channel (a softmax over rows, a sigmoid),
# so only the model whose consumers of the dropped channels are zeroed too is compared.
_LAYOUTS = {"nc": ((5, 4), lambda: nn.Linear(4, 6), 1), "ncl": ((2, 3, 8), lambda: nn.Conv1d(3, 6, 1), 1),
            "nlc": ((2, 8, 4), lambda: nn.Linear(4, 6), 2)}


class _OpNet(nn.Module):
    """``a -> op(y, c, z) -> b``: ``c`` the channel axis, ``z`` the output
    of a second producer ``a2`` (``two``); ``b`` a Conv1d where the op
    leaves a ``(B, C, L)`` tensor of a Conv1d, else a Linear on its last axis."""

    def __init__(self, layout, op, two=False):
        super().__init__()
        shape, make, self.c = _LAYOUTS[layout]
        torch.manual_seed(0)
        self.a, self.a2, self.op = make(), make() if two else None, op
        with torch.no_grad():
            z = self.middle(torch.randn(shape))
        conv = layout == "ncl" and z.dim() == 3
        self.b = None if z.dim() == 0 else nn.Conv1d(z.shape[1], 2, 1) if conv else nn.Linear(z.shape[-1], 2)

    def middle(self, t):
        z = self.op(self.a(t), self.c, None if self.a2 is None else self.a2(t))
        z = z[0] if isinstance(z, (tuple, list)) else z
        return z.real if z.is_complex() else z if z.is_floating_point() else z.float()

    def forward(self, t):
        z = self.middle(t)
        return z if self.b is None else self.b(z)


def _l(y, c):  # the axis that is neither the rows (0) nor the channels: L of (B, C, L) / (B, L, C), else 0
    return ({1, 2} - {c}).pop() if y.dim() == 3 else 0


def _ch(y, c, i):  # y[..., i] on the channel axis
    return y[(slice(None),) * c + (i,)]


def _rows(y, c):  # (rows, C): the channels last, every other axis flattened
    return y.movedim(c, -1).reshape(-1, y.shape[c])


def _ch1(y, c):  # (N, C, ...): the channels on axis 1
    return y.movedim(c, 1)


def _vec(y, c, v):  # a vector along the channels, shaped to broadcast against y
    return v.view([-1 if i == c else 1 for i in range(y.dim())])


def _case(id, op, expect=None, on="nc ncl nlc", two=False, zero=True, marks=()):
    return pytest.param(op, expect, on.split(), two, zero, id=id, marks=marks)


_F = torch.nn.functional
_REDUCTIONS = ("sum", "mean", "amax", "amin", "prod", "std", "var", "nansum", "nanmean", "logsumexp")
_FFTS = [f"{kind}{rank}" for kind in ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft") for rank in ("", "2", "n")]

_CATALOGUE = [
    # element-wise
    *[_case(f"elementwise-{n}", f, "cut") for n, f in [
        ("relu", lambda y, c, z: y.relu()), ("torch.relu", lambda y, c, z: torch.relu(y)),
        ("gelu", lambda y, c, z: _F.gelu(y)), ("silu", lambda y, c, z: _F.silu(y)),
        ("leaky_relu", lambda y, c, z: _F.leaky_relu(y, 0.1)), ("elu", lambda y, c, z: _F.elu(y)),
        ("hardtanh", lambda y, c, z: _F.hardtanh(y)), ("hardswish-relu6", lambda y, c, z: _F.hardswish(_F.relu6(y))),
        ("tanh", lambda y, c, z: torch.tanh(y)), ("abs-neg", lambda y, c, z: -y.abs()),
        ("mul-div", lambda y, c, z: y * y * 2 / 3), ("pow", lambda y, c, z: y.pow(2) + y ** 3),
        ("clamp", lambda y, c, z: y.clamp(-0.5, 0.5) + torch.clamp(y, max=0.2) + y.clamp(min=0)),
        ("sign", lambda y, c, z: torch.sign(y)), ("sigmoid-gate", lambda y, c, z: y * torch.sigmoid(y)),
        ("exp-1", lambda y, c, z: y.exp() - 1), ("cos-1", lambda y, c, z: torch.cos(y) - 1),
        ("dropout", lambda y, c, z: _F.dropout(y, 0.5, training=False)), ("nan_to_num", lambda y, c, z: y.nan_to_num()),
        ("dtype-views", lambda y, c, z: y.double().float().view(torch.int32).view(torch.float32)),
        ("where", lambda y, c, z: torch.where(y > 0, y, 0.0)), ("masked_fill", lambda y, c, z: y.masked_fill(y < 0, 0)),
        ("where-zeros_like", lambda y, c, z: torch.where(y > 0, y, torch.zeros_like(y))),
        ("masked_fill-rows", lambda y, c, z: y.masked_fill(
            torch.arange(y.shape[0]).view([-1] + [1] * (y.dim() - 1)) == 0, 0)),
        ("stats-over-rows", lambda y, c, z: y - y.mean(0, keepdim=True)),
        ("over-a-norm-of-channels", lambda y, c, z: y / (y.norm(dim=c, keepdim=True) + 1)),
    ]],
    *[_case(f"elementwise-{n}", f, "cut", zero=False) for n, f in [
        ("sigmoid", lambda y, c, z: torch.sigmoid(y)), ("add-1", lambda y, c, z: y + 1),
        ("softplus", lambda y, c, z: _F.softplus(y))]],
    *[_case(f"binary-{n}", f, "cut", two=True) for n, f in [
        ("add", lambda y, c, z: y + z), ("add-alpha", lambda y, c, z: torch.add(y, z, alpha=2)),
        ("maximum", lambda y, c, z: torch.maximum(y, z)), ("max", lambda y, c, z: torch.max(y, z)),
        ("lerp", lambda y, c, z: torch.lerp(y, z, 0.3)), ("addcmul", lambda y, c, z: torch.addcmul(y, y, z)),
        ("where", lambda y, c, z: torch.where(y > 0, y, z)), ("add_", lambda y, c, z: y.clone().add_(z)),
        ("copy_", lambda y, c, z: y.clone().copy_(z)), ("rows-flipped", lambda y, c, z: y + z.flip(0)),
        ("stack-sum", lambda y, c, z: torch.stack([y, z]).sum(0)),
        ("stack-1", lambda y, c, z: torch.stack([y, z], 1).sum(1)),
        ("write-rows", lambda y, c, z: _written(y, 0, z[0])),
        ("add-out", lambda y, c, z: torch.add(y, z, out=torch.empty_like(y))),
    ]],
    _case("binary-rolled-channels", lambda y, c, z: y + z.roll(1, c), "fix", two=True),
    # entries along the channels that no layer produces
    _case("masked_fill-channel-mask", lambda y, c, z: y.masked_fill(_vec(y, c, torch.arange(y.shape[c]) % 2 == 0), 0),
          "fix"),
    _case("where-channel-mask", lambda y, c, z: torch.where(_vec(y, c, _EVERY_OTHER), y, 0.0), "fix"),
    _case("mul-int-channels", lambda y, c, z: y * _vec(y, c, torch.arange(y.shape[c])), "fix"),
    _case("mul-float-channels", lambda y, c, z: y * _vec(y, c, torch.arange(6.0)), "fix"),
    _case("mul_-float-channels", lambda y, c, z: y.clone().mul_(_vec(y, c, torch.arange(6.0))), "fix"),
    _case("masked_scatter", lambda y, c, z: y.masked_scatter(y > 0, -y), "fix"),
    # writes
    _case("write-row", lambda y, c, z: _written(y, 0, 0.0), "cut"),
    _case("write-mask", lambda y, c, z: _written(y, y < 0, 0.0), "cut"),
    _case("write-channel", lambda y, c, z: _written(y, (slice(None),) * c + (1,), 0.0), "fix"),
    _case("write-channels", lambda y, c, z: _written(y, (slice(None),) * c + (slice(1, 3),), 0.0), "fix"),
    _case("write-into-zeros_like", lambda y, c, z: _written(y, slice(1, 2), y[1:2], into=torch.zeros_like), "cut"),
    _case("write-into-zeros-of-its-shape", lambda y, c, z: _written(y, slice(None), y,
                                                                    into=lambda y: torch.zeros(y.shape)), "cut"),
    _case("write-into-unfollowed", lambda y, c, z: _written(y, slice(None), y, into=lambda y: torch.zeros(
        [6 if i == c else n for i, n in enumerate(y.shape)])), "fix"),
    _case("index_put-rows", lambda y, c, z: y.clone().index_put_((torch.tensor([0]),), torch.tensor(0.0)), "cut"),
    _case("index_put-channel", lambda y, c, z: _rows(y, c).clone().index_put_((torch.tensor([0]), torch.tensor([1])),
                                                                            torch.tensor(0.0)), "fix"),
    _case("fill_", lambda y, c, z: y.clone().fill_(0.0), "cut"),
    # (an out= buffer shaped like the channels, filled with six columns of ones whatever the cut: not y's channels)
    _case("ones-out", lambda y, c, z: torch.ones([6 if i == c else n for i, n in enumerate(y.shape)],
                                                 out=torch.empty_like(y)), "fix"),
    # reductions
    *[_case(f"{r}-rows", (lambda r: lambda y, c, z: getattr(y, r)(_l(y, c)))(r), "cut", zero=r != "logsumexp")
      for r in _REDUCTIONS],
    *[_case(f"{r}-rows-keepdim", (lambda r: lambda y, c, z: getattr(torch, r)(y, dim=0, keepdim=True))(r), "cut",
            zero=r != "logsumexp") for r in _REDUCTIONS],
    *[_case(f"{r}-rows-negative-tuple", (lambda r: lambda y, c, z: getattr(y, r)((_l(y, c) - y.dim(),)))(r), "cut",
            zero=r != "logsumexp") for r in _REDUCTIONS if r != "prod"],
    *[_case(f"{r}-channels", (lambda r: lambda y, c, z: getattr(y, r)(c))(r), "fix") for r in _REDUCTIONS],
    *[_case(f"{r}-channels-negative-keepdim", (lambda r: lambda y, c, z: getattr(y, r)(c - y.dim(), True))(r), "fix")
      for r in _REDUCTIONS if r != "prod"],
    *[_case(f"{r}-all", (lambda r: lambda y, c, z: y * getattr(y, r)())(r), "fix")
      for r in ("sum", "mean", "amax", "amin", "prod", "std", "var", "nansum", "nanmean", "max", "min", "median")],
    _case("sum-rows-and-channels", lambda y, c, z: y.sum((0, c)), "fix"),
    _case("sum-l", lambda y, c, z: y.sum(_l(y, c)), "cut"),
    _case("sum-no-dims", lambda y, c, z: y * y.sum(dim=[])),
    _case("std-unbiased", lambda y, c, z: y.std(_l(y, c), True), "cut"),
    _case("std-unbiased-keepdim", lambda y, c, z: torch.std(y, _l(y, c), True, True), "cut"),
    _case("var-unbiased", lambda y, c, z: y.var(_l(y, c), False), "cut"),
    _case("var_mean-unbiased", lambda y, c, z: torch.var_mean(y, _l(y, c), True)[0], "cut"),
    _case("std_mean-keepdim", lambda y, c, z: torch.std_mean(y, 0, keepdim=True)[1], "cut"),
    _case("std-correction", lambda y, c, z: y.std(0, correction=0, keepdim=True), "cut"),
    _case("max-rows", lambda y, c, z: y.max(_l(y, c))[0], "cut"),
    _case("max-rows-values", lambda y, c, z: y.max(dim=_l(y, c)).values, "cut"),
    _case("max-rows-keepdim", lambda y, c, z: torch.max(y, 0, True)[0], "cut"),
    _case("max-rows-indices", lambda y, c, z: y.max(_l(y, c))[1], "cut"),
    _case("min-rows-indices", lambda y, c, z: y.min(0, keepdim=True).indices, "cut"),
    _case("max-channels", lambda y, c, z: y.max(c)[0], "fix"),
    _case("min-channels-indices", lambda y, c, z: y.min(c - y.dim(), keepdim=True)[1], "fix"),
    _case("median-rows", lambda y, c, z: y.median(_l(y, c))[0], "cut"),
    _case("median-rows-indices", lambda y, c, z: y.median(0, True).indices, "cut", zero=False),
    _case("median-channels", lambda y, c, z: y.median(c)[0], "fix"),
    _case("nanmedian-rows", lambda y, c, z: y.nanmedian(_l(y, c))[0], "cut"),
    _case("nanmedian-channels", lambda y, c, z: torch.nanmedian(y, c)[0], "fix"),
    _case("all-rows", lambda y, c, z: (y > 0).all(_l(y, c)), "cut"),
    _case("any-rows", lambda y, c, z: torch.any(y > 0, dim=_l(y, c)), "cut"),
    _case("any-channels", lambda y, c, z: y * (y > 0).any(c, keepdim=True), "fix"),
    _case("count_nonzero-rows", lambda y, c, z: torch.count_nonzero(y, dim=_l(y, c)), "cut"),
    _case("count_nonzero-channels", lambda y, c, z: torch.count_nonzero(y, c), "fix"),
    _case("argmax-rows", lambda y, c, z: y.argmax(_l(y, c)), "cut"),
    _case("argmin-rows-keepdim", lambda y, c, z: torch.argmin(y, dim=0, keepdim=True), "cut"),
    _case("argmax-channels", lambda y, c, z: y.argmax(c), "fix"),
    _case("argmax-all", lambda y, c, z: y * y.argmax(), "fix"),
    _case("special.logsumexp-rows", lambda y, c, z: torch.special.logsumexp(y, _l(y, c)), "cut", zero=False),
    _case("special.logsumexp-channels", lambda y, c, z: torch.special.logsumexp(y, c), "fix"),
    _case("quantile-channels", lambda y, c, z: torch.quantile(y, 0.5, dim=c), "fix"),
    _case("quantile-rows", lambda y, c, z: torch.quantile(y, 0.5, dim=_l(y, c))),
    _case("cosine_similarity-channels", lambda y, c, z: _F.cosine_similarity(y, z, dim=c), "fix", two=True),
    _case("sum_to_size-rows", lambda y, c, z: y.sum_to_size([s if i == c else 1 for i, s in enumerate(y.shape)]),
          "cut"),
    _case("sum_to_size-channels",
          lambda y, c, z: y * y.sum_to_size([1 if i == c else n for i, n in enumerate(y.shape)]),
          "fix"),
    # norms
    _case("norm-channels", lambda y, c, z: y * y.norm(dim=c, keepdim=True), "cut"),
    _case("norm-1-channels", lambda y, c, z: y * torch.norm(y, 1, c, True), "cut"),
    _case("norm-inf-channels", lambda y, c, z: y * y.norm(float("inf"), c, True), "cut"),
    _case("norm-fro-channels", lambda y, c, z: y * y.norm("fro", dim=c, keepdim=True), "cut"),
    _case("norm-negative-channels", lambda y, c, z: y * y.norm(-1, c, True), "fix"),
    _case("norm-rows", lambda y, c, z: y.norm(dim=_l(y, c)), "cut"),
    _case("norm-all", lambda y, c, z: y * y.norm(), "cut"),
    _case("vector_norm-channels", lambda y, c, z: y * torch.linalg.vector_norm(y, dim=c - y.dim(), keepdim=True),
          "cut"),
    _case("vector_norm-negative-ord", lambda y, c, z: y * torch.linalg.vector_norm(y, ord=-2, dim=c, keepdim=True),
          "fix"),
    _case("vector_norm-rows", lambda y, c, z: torch.linalg.vector_norm(y, 2, _l(y, c)), "cut"),
    _case("linalg.norm-channels", lambda y, c, z: y * torch.linalg.norm(y, dim=c, keepdim=True), "cut"),
    _case("linalg.norm-negative-channels", lambda y, c, z: y * torch.linalg.norm(y, -1, dim=c, keepdim=True), "fix"),
    _case("linalg.norm-rows", lambda y, c, z: torch.linalg.norm(y, dim=_l(y, c)), "cut"),
    # written into an out= buffer that carries y's channels (of no elements: resized without a warning)
    _case("norm-channels-out", lambda y, c, z: y * torch.norm(y, dim=c, keepdim=True, out=torch.empty_like(y)[:0]),
          "cut"),
    _case("norm-rows-out", lambda y, c, z: torch.norm(y, dim=_l(y, c), out=torch.empty_like(y)[:0]), "cut"),
    _case("vector_norm-channels-out",
          lambda y, c, z: y * torch.linalg.vector_norm(y, 2, c, True, out=torch.empty_like(y)[:0]), "cut"),
    _case("vector_norm-rows-out", lambda y, c, z: torch.linalg.vector_norm(y, 2, _l(y, c), out=torch.empty_like(y)[:0]),
          "cut"),
    # along a dim
    _case("softmax-rows", lambda y, c, z: y.softmax(0), "cut", zero=False),
    _case("softmax-rows-kw", lambda y, c, z: _F.softmax(y, dim=-y.dim()), "cut", zero=False),
    _case("softmax-channels", lambda y, c, z: torch.softmax(y, c), "fix"),
    _case("softmax-channels-kw", lambda y, c, z: _F.softmax(y, dim=c - y.dim()), "fix"),
    _case("log_softmax-channels", lambda y, c, z: _F.log_softmax(y, c), "fix"),
    _case("softmin-channels", lambda y, c, z: _F.softmin(y, c), "fix"),
    _case("softmin-rows", lambda y, c, z: _F.softmin(y, 0), "cut", zero=False),
    _case("special.softmax-channels", lambda y, c, z: torch.special.softmax(y, c), "fix"),
    _case("special.log_softmax-channels", lambda y, c, z: torch.special.log_softmax(y, c), "fix"),
    _case("nn.Softmax-channels", lambda y, c, z: nn.Softmax(dim=c)(y), "fix"),
    _case("nn.Softmin-channels", lambda y, c, z: nn.Softmin(dim=c)(y), "fix"),
    _case("nn.LogSoftmax-channels", lambda y, c, z: nn.LogSoftmax(c)(y), "fix"),
    _case("cumsum-rows", lambda y, c, z: y.cumsum(0), "cut"),
    _case("cumsum-channels", lambda y, c, z: torch.cumsum(y, dim=c), "fix"),
    _case("cumprod-rows", lambda y, c, z: y.cumprod(-y.dim()), "cut"),
    _case("cummax-rows", lambda y, c, z: torch.cummax(y, dim=0).values, "cut"),
    _case("cummin-rows-indices", lambda y, c, z: torch.cummin(y, dim=0)[1], "cut", zero=False),
    _case("cummax-channels", lambda y, c, z: y.cummax(c)[0], "fix"),
    _case("logcumsumexp-rows", lambda y, c, z: torch.logcumsumexp(y, 0), "cut", zero=False),
    _case("logcumsumexp-channels", lambda y, c, z: y.logcumsumexp(c), "fix"),
    _case("cumulative_trapezoid-channels", lambda y, c, z: torch.cumulative_trapezoid(y, dim=c), "fix"),
    _case("sort-rows", lambda y, c, z: y.sort(0)[0], "cut"),
    _case("sort-rows-indices", lambda y, c, z: torch.sort(y, dim=0, descending=True).indices, "cut", zero=False),
    _case("sort-rows-positional", lambda y, c, z: torch.sort(y, 0, True)[0], "cut"),
    _case("sort-rows-stable", lambda y, c, z: torch.sort(y, stable=True, dim=0)[0], "cut"),
    _case("sort-default", lambda y, c, z: y.sort()[0]),
    _case("sort-channels", lambda y, c, z: y.sort(c)[0], "fix"),
    _case("argsort-rows", lambda y, c, z: y.argsort(0), "cut", zero=False),
    _case("argsort-channels", lambda y, c, z: y.argsort(c), "fix"),
    _case("topk-rows", lambda y, c, z: y.topk(2, 0)[0], "cut"),
    _case("topk-rows-indices", lambda y, c, z: torch.topk(y, 2, dim=0, largest=False).indices, "cut", zero=False),
    _case("topk-channels", lambda y, c, z: y.topk(2, c)[0], "fix"),
    _case("topk-default", lambda y, c, z: y.topk(2)[0]),
    _case("kthvalue-rows", lambda y, c, z: y.kthvalue(2, _l(y, c))[0], "cut"),
    _case("kthvalue-rows-keepdim", lambda y, c, z: y.kthvalue(2, 0, True)[1], "cut", zero=False),
    _case("kthvalue-channels", lambda y, c, z: y.kthvalue(2, c)[0], "fix"),
    _case("kthvalue-after-the-channels", lambda y, c, z: (y[..., None] * torch.arange(3.0)).kthvalue(2, -1)[0], "cut"),
    _case("mode-rows", lambda y, c, z: y.mode(_l(y, c))[0], "cut"),
    _case("mode-channels", lambda y, c, z: torch.mode(y, c)[0], "fix"),
    _case("index_select-rows", lambda y, c, z: y.index_select(0, torch.tensor([1, 0])), "cut"),
    _case("index_select-rows-kw", lambda y, c, z: torch.index_select(y, dim=-y.dim(), index=torch.tensor([1, 0])),
          "cut"),
    _case("index_select-channels", lambda y, c, z: y.index_select(c, torch.tensor([0, 2, 4])), "fix"),
    _case("index_add-rows", lambda y, c, z: torch.index_add(y, 0, torch.tensor([1, 0]), z[:2], alpha=2), "cut",
          two=True),
    _case("index_copy-rows", lambda y, c, z: y.index_copy(0, torch.tensor([1, 0]), y[:2]), "cut"),
    _case("index_fill-rows", lambda y, c, z: y.index_fill(0, torch.tensor([1]), 0.0), "cut"),
    _case("index_fill-channels", lambda y, c, z: y.index_fill(c, torch.tensor([1]), 0.0), "fix"),
    _case("index_reduce-rows", lambda y, c, z: y.index_reduce(0, torch.tensor([1, 0]), y[:2], "amax"), "cut",
          marks=pytest.mark.filterwarnings("ignore:index_reduce.. is in beta")),
    _case("scatter-rows", lambda y, c, z: y.scatter(0, y.argsort(0), y), "cut"),
    _case("scatter_add-rows", lambda y, c, z: y.scatter_add(0, y.argsort(0), y), "cut"),
    _case("scatter_reduce-rows", lambda y, c, z: y.scatter_reduce(0, y.argsort(0), y, "sum", include_self=False),
          "cut"),
    _case("scatter_add-expanded-index", lambda y, c, z: torch.zeros_like(y).scatter_add(
        0, torch.zeros([1] * y.dim(), dtype=torch.long).expand(y.shape), y), "cut"),
    _case("scatter-channels", lambda y, c, z: y.scatter(c, y.argsort(c), y), "fix"),
    _case("gather-rows", lambda y, c, z: y.gather(0, y.argsort(0)), "cut"),
    _case("gather-channels", lambda y, c, z: torch.gather(y, c, y.argsort(c)), "fix"),
    _case("gather-rows-index-by-channel", lambda y, c, z: y.gather(0, _vec(y, c, torch.arange(y.shape[c]) % 2).expand(
        [1 if i == 0 else n for i, n in enumerate(y.shape)])), "fix"),
    _case("gather-rows-index-expanded", lambda y, c, z: y.gather(0, torch.ones([1] * y.dim(), dtype=torch.long).expand(
        [1 if i == 0 else n for i, n in enumerate(y.shape)])), "cut"),
    _case("take_along_dim-rows", lambda y, c, z: torch.take_along_dim(y, y.argsort(0), 0), "cut"),
    _case("take_along_dim-channels", lambda y, c, z: torch.take_along_dim(y, y.argsort(c), dim=c), "fix"),
    _case("narrow-rows", lambda y, c, z: y.narrow(0, 0, 1), "cut"),
    _case("narrow-channels", lambda y, c, z: torch.narrow(y, c, 0, 3), "fix"),
    _case("roll-rows", lambda y, c, z: torch.roll(y, shifts=1, dims=0), "cut"),
    _case("roll-channels", lambda y, c, z: y.roll(1, c), "fix"),
    _case("roll-channels-tuple", lambda y, c, z: torch.roll(y, (1,), (c - y.dim(),)), "fix"),
    _case("roll-both", lambda y, c, z: y.roll((1, 1), (0, c)), "fix"),
    _case("roll-flat", lambda y, c, z: y.roll(1), "fix"),
    _case("flip-rows", lambda y, c, z: torch.flip(y, dims=(-y.dim(),)), "cut"),
    _case("flip-channels", lambda y, c, z: y.flip(c - y.dim()), "fix"),
    _case("flip-list", lambda y, c, z: torch.flip(y, [0, c]), "fix"),
    _case("split-rows", lambda y, c, z: torch.cat(y.split(1, 0)[::-1], 0), "cut"),
    _case("split-rows-sizes", lambda y, c, z: torch.split(y, [1, y.shape[0] - 1], dim=0)[1], "cut"),
    _case("split-channels", lambda y, c, z: torch.cat(y.split(3, c)[::-1], c), "fix"),
    _case("split_with_sizes-channels", lambda y, c, z: torch.cat(y.split_with_sizes([2, 4], c)[::-1], c), "fix"),
    _case("chunk-rows", lambda y, c, z: y.chunk(2, 0)[0], "cut"),
    _case("chunk-channels", lambda y, c, z: torch.cat(torch.chunk(y, 2, dim=c)[::-1], c), "fix"),
    _case("tensor_split-rows", lambda y, c, z: y.tensor_split(2, 0)[1], "cut"),
    _case("tensor_split-channels", lambda y, c, z: torch.cat(y.tensor_split([2], c)[::-1], c), "fix"),
    _case("unbind-rows", lambda y, c, z: torch.stack(y.unbind(0)[::-1], 0), "cut"),
    _case("unbind-channels", lambda y, c, z: torch.stack(y.unbind(c)[::-1], c), "fix"),
    _case("select-rows", lambda y, c, z: y.select(0, 1), "cut", on="nc nlc"),
    _case("select-after-the-channels", lambda y, c, z: (y.unsqueeze(-1) * torch.ones(3)).select(-1, 0), "cut"),
    _case("select-channels", lambda y, c, z: y * y.select(c, 1).unsqueeze(c), "fix"),
    _case("diff-rows", lambda y, c, z: y.diff(dim=0), "cut"),
    _case("diff-rows-positional", lambda y, c, z: torch.diff(y, 1, 0, prepend=y[:1]), "cut"),
    _case("diff-channels", lambda y, c, z: torch.diff(y, dim=c), "fix"),
    _case("normalize-rows", lambda y, c, z: _F.normalize(y, 2.0, 0), "cut"),
    _case("normalize-channels", lambda y, c, z: _F.normalize(y, dim=c)),
    _case("renorm-rows", lambda y, c, z: y.renorm(2, 0, 1.0), "fix"),
    _case("renorm-channels", lambda y, c, z: y.renorm(2, c, 1.0), "fix"),
    *[_case(f"fft.{f}-channels", (lambda f: lambda y, c, z: getattr(torch.fft, f)(
        y, dim=c if f[-1] not in "2n" else (0, c)))(f), "fix") for f in _FFTS],
    *[_case(f"fft.{f}-rows", (lambda f: lambda y, c, z: getattr(torch.fft, f)(
        y, dim=0 if f[-1] not in "2n" else (0, _l(y, c))))(f), "cut", on="ncl nlc") for f in _FFTS],
    _case("fft.fft-default", lambda y, c, z: torch.fft.fft(y)),
    _case("fft.fftshift-channels", lambda y, c, z: torch.fft.fftshift(y, c), "fix"),
    _case("fft.fftshift-all", lambda y, c, z: torch.fft.fftshift(y), "fix"),
    _case("fft.ifftshift-rows", lambda y, c, z: torch.fft.ifftshift(y, dim=0), "cut"),
    # axes an op's name implies, spatial axes, pads
    _case("fliplr", lambda y, c, z: torch.fliplr(y.movedim(c, 1)).movedim(1, c), "fix"),
    _case("flipud", lambda y, c, z: y.flipud(), "cut"),
    _case("msort", lambda y, c, z: torch.msort(y), "cut"),
    _case("msort-channels", lambda y, c, z: torch.msort(y.movedim(c, 0)).movedim(0, c), "fix"),
    _case("rot90", lambda y, c, z: torch.rot90(y.movedim(c, 1), 2).movedim(1, c), "fix"),
    _case("rot90-other-axes", lambda y, c, z: torch.rot90(y, 2, (0, _l(y, c))), "cut", on="ncl nlc"),
    _case("triu", lambda y, c, z: torch.triu(y.movedim(c, -1)).movedim(-1, c), "fix"),
    _case("tril", lambda y, c, z: y.movedim(c, -2).tril(-1).movedim(-2, c), "fix"),
    _case("triu-other-axes", lambda y, c, z: torch.triu(y.movedim(c, 0)[..., None]).squeeze(-1).movedim(0, c), "cut"),
    *[_case(f"{n}-channels", (lambda f: lambda y, c, z: f(y.movedim(c, -1)).movedim(-1, c))(f), "fix") for n, f in [
        ("avg_pool1d", lambda t: _F.avg_pool1d(t, 3, 1, 1)), ("max_pool1d", lambda t: _F.max_pool1d(t, 3, 1, 1)),
        ("lp_pool1d", lambda t: _F.lp_pool1d(t, 2, 1)), ("adaptive_max_pool1d", lambda t: _F.adaptive_max_pool1d(t, 6)),
        ("avg_pool2d", lambda t: _F.avg_pool2d(t[..., None, :], (1, 3), 1, (0, 1))[..., 0, :])]],
    *[_case(f"{n}-rows", (lambda f: lambda y, c, z: f(y.movedim(0, -1)).movedim(-1, 0))(f), "cut") for n, f in [
        ("avg_pool1d", lambda t: _F.avg_pool1d(t, 3, 1, 1)), ("max_pool1d", lambda t: _F.max_pool1d(t, 2)),
        ("adaptive_avg_pool1d", lambda t: _F.adaptive_avg_pool1d(t, 3)),
        ("adaptive_avg_pool2d", lambda t: _F.adaptive_avg_pool2d(t[..., None], (1, 1))[..., 0]),
        ("interpolate", lambda t: _F.interpolate(t if t.dim() == 3 else t[None], scale_factor=2).reshape(
            *t.shape[:-1], -1))]],
    _case("pad-channels-shift", lambda y, c, z: _F.pad(y.movedim(c, -1), (1, -1)).movedim(-1, c), "fix"),
    _case("constant_pad_nd-channels", lambda y, c, z: torch.constant_pad_nd(y.movedim(c, -1), (-1, 1)).movedim(-1, c),
          "fix"),
    _case("pad-rows", lambda y, c, z: _F.pad(y.movedim(0, -1), (1, 1)).movedim(-1, 0), "cut"),
    _case("pad-rows-zero-channels", lambda y, c, z: _F.pad(y.movedim(c, -1), (0, 0, 1, 1)).movedim(-1, c), "cut"),
    # shapes
    _case("view-flat", lambda y, c, z: y.view(-1), "fix"),
    _case("reshape-same", lambda y, c, z: y.reshape(*y.shape), "cut"),
    _case("flatten-from-the-channels", lambda y, c, z: y.flatten(c), "cut"),
    _case("flatten-before-the-channels", lambda y, c, z: y.flatten(0, max(c - 1, 0)), "cut"),
    _case("nn.Flatten", lambda y, c, z: nn.Flatten()(y)),
    _case("unflatten-rows", lambda y, c, z: y.unflatten(0, (1, -1)), "cut", on="nc nlc"),
    _case("unflatten-channels", lambda y, c, z: y.unflatten(c, (2, -1)).flatten(c)),
    _case("split-channels-by-view", lambda y, c, z: y.reshape(*y.shape[:c], 2, -1, *y.shape[c + 1:]).transpose(
        c, c + 1).flatten(c, c + 1), "fix"),
    _case("unsqueeze-squeeze", lambda y, c, z: y.unsqueeze(0).squeeze(0), "cut"),
    _case("unsqueeze-flatten", lambda y, c, z: y.unsqueeze(-1).flatten(-2), "cut"),
    _case("squeeze-dim", lambda y, c, z: y[None].squeeze(dim=0), "cut"),
    _case("expand", lambda y, c, z: y.unsqueeze(0).expand(3, *y.shape).sum(0)),
    _case("expand_as", lambda y, c, z: y[:1].expand_as(y)),
    _case("broadcast_to", lambda y, c, z: torch.broadcast_to(y, (2, *y.shape))[0]),
    _case("broadcast_tensors", lambda y, c, z: torch.broadcast_tensors(y, y[:1])[1]),
    _case("view_as", lambda y, c, z: y.view_as(y)),
    _case("reshape_as", lambda y, c, z: y.reshape_as(z), two=True),
    # sizes read off the channels: a tensor made as wide as the channels (torch.ones(y.shape)) has them, and the cut
    # follows them there; one whose width the graph cannot follow (twice the channels, int() of them) fixes them.
    # The graph took both for tensors of a width no cut changes: the cut model failed ("mat1 and mat2 shapes cannot
    # be multiplied"), or the channels were fixed where they met (y * torch.ones(y.shape))
    _case("ones-of-its-shape", lambda y, c, z: torch.ones(y.shape), "cut", zero=False),
    _case("mul-ones-of-its-shape", lambda y, c, z: y * torch.ones(y.shape), "cut"),
    _case("cat-zeros-of-its-shape", lambda y, c, z: torch.cat([y, torch.zeros(y.shape)], c), "cut"),
    _case("cat-zeros-of-its-shape-by-keyword", lambda y, c, z: torch.cat([y, torch.zeros(size=y.shape)], c), "cut"),
    _case("cat-empty-rand-randn-of-its-shape", lambda y, c, z: torch.cat(
        [y, torch.empty(y.shape).fill_(0.0), torch.rand(y.shape) * 0, torch.randn(y.shape) * 0], c), "cut"),
    _case("cat-new_ones-of-its-shape", lambda y, c, z: torch.cat([y.new_ones(y.shape), y], c), "cut", zero=False),
    _case("cat-new_zeros-new_empty-new_full-of-its-sizes", lambda y, c, z: torch.cat(
        [y, y.new_zeros(*y.shape), y.new_empty(y.shape).fill_(0.0), y.new_full(y.size(), 0.0)], c), "cut"),
    _case("full-of-its-size", lambda y, c, z: torch.full(y.size(), 2.0), "cut", zero=False),
    _case("ones-of-its-dims", lambda y, c, z: torch.ones(*[y.shape[i] for i in range(y.dim())]), "cut", zero=False),
    _case("cat-zeros-of-its-sizes", lambda y, c, z: torch.cat([y, torch.zeros(*[y.size(i) for i in range(y.dim())])],
                                                              c), "cut"),
    _case("cat-expand-to-its-shape", lambda y, c, z: torch.cat(
        [y, torch.zeros([1 if i == c else n for i, n in enumerate(y.shape)]).expand(y.shape)], c), "cut"),
    _case("cat-broadcast_to-its-shape", lambda y, c, z: torch.cat([torch.broadcast_to(torch.tensor(0.0), y.shape), y],
                                                                  c), "cut"),
    _case("cat-repeat-tile-to-its-shape", lambda y, c, z: torch.cat(
        [y, torch.zeros([1] * y.dim()).repeat(*y.shape), torch.zeros(1).tile(y.shape)], c), "cut"),
    _case("view-of-its-sizes", lambda y, c, z: y.view(*[y.size(i) for i in range(y.dim())]), "cut"),
    _case("reshape-rows-of-its-shape", lambda y, c, z: y.reshape(y.shape[0], *y.shape[1:]) * y.shape[0], "cut"),
    _case("reshape-to-the-others-shape", lambda y, c, z: torch.cat([y, z.reshape(y.shape)], c), "cut", two=True),
    _case("cat-zeros-of-twice-its-width", lambda y, c, z: torch.cat(
        [y, torch.zeros(*y.shape[:c], 2 * y.shape[c], *y.shape[c + 1:])], c), "fix"),
    _case("ones-square-of-its-width", lambda y, c, z: torch.ones(y.shape[c], y.shape[c]), "fix"),
    _case("zeros-of-its-numel-viewed", lambda y, c, z: torch.zeros(y.numel()).view(y.shape), "fix"),
    _case("view-of-its-width", lambda y, c, z: torch.zeros(60).view(-1, y.shape[c]), "fix"),
    _case("cat-zeros-of-its-shape-as-ints", lambda y, c, z: torch.cat([y, torch.zeros([int(n) for n in y.shape])], c),
          "fix"),
    _case("div-by-its-width", lambda y, c, z: y / y.shape[c], "fix"),
    _case("mul-by-its-nelement", lambda y, c, z: y * y.nelement(), "fix"),
    # a float computed from the width (a true division, float(), a power, math.sqrt through float()) was a plain
    # float the graph did not see: the channels stayed cuttable, and the cut model scaled by the cut width (another
    # output than the masked one's)
    _case("mul-by-the-reciprocal-of-its-width", lambda y, c, z: y * (1.0 / y.shape[c]), "fix"),
    _case("div-by-the-sqrt-of-its-width", lambda y, c, z: y / math.sqrt(y.shape[c]), "fix"),
    _case("mul-by-half-its-width", lambda y, c, z: y * (y.shape[c] / 2), "fix"),
    _case("mul-by-two-over-its-width", lambda y, c, z: y * (2 / y.size(c)), "fix"),
    _case("mul-by-its-width-as-float", lambda y, c, z: y * float(y.shape[c]), "fix"),
    _case("mul-by-its-width-to-a-float-power", lambda y, c, z: y * y.shape[c] ** -0.5 * y.shape[c] ** 0.5, "fix"),
    _case("mul-by-its-width-times-a-float", lambda y, c, z: y * (y.shape[c] * 0.5 + 1.5), "fix"),
    _case("cat-zeros-of-its-len", lambda y, c, z: torch.cat(  # (len() of a tensor with the channels first: a plain int)
        [y, torch.zeros(len(y.movedim(c, 0)), *[n for i, n in enumerate(y.shape) if i != c]).movedim(0, c)], c), "fix"),
    # permutes
    _case("t", lambda y, c, z: y.t().relu().t(), "cut", on="nc"),
    _case("T", lambda y, c, z: y.T.relu().T, "cut", on="nc"),
    _case("mT", lambda y, c, z: y.mT.relu().mT, "cut"),
    _case("mH", lambda y, c, z: y.mH.relu().mH, "cut"),
    _case("H", lambda y, c, z: y.H.relu().H, "cut", on="nc"),
    _case("transpose", lambda y, c, z: y.transpose(0, c).relu().transpose(0, c), "cut"),
    _case("swapaxes-swapdims", lambda y, c, z: torch.swapaxes(y, 0, c).relu().swapdims(c, 0), "cut"),
    _case("permute", lambda y, c, z: y.permute(*range(y.dim())[::-1]).relu().permute(*range(y.dim())[::-1]), "cut"),
    _case("movedim", lambda y, c, z: y.movedim(c, 0).relu().movedim(0, c), "cut"),
    _case("moveaxis", lambda y, c, z: torch.moveaxis(y, c, -1).relu().moveaxis(-1, c), "cut"),
    _case("adjoint", lambda y, c, z: y.adjoint().relu().adjoint(), "cut"),
    _case("transpose-flatten", lambda y, c, z: y.transpose(c, -1).reshape(-1, y.shape[c]), "cut"),
    # cat, stack
    _case("cat-channels-twice", lambda y, c, z: torch.cat([y, y], c), "cut"),
    _case("cat-channels", lambda y, c, z: torch.cat([y, z], c - y.dim()), "cut", two=True),
    _case("cat-rows", lambda y, c, z: torch.cat((y, z), dim=0), "cut", two=True),
    _case("concat-channels", lambda y, c, z: torch.concat([z, y], c), "cut", two=True),
    _case("concatenate-axis", lambda y, c, z: torch.concatenate([y, z], axis=c), two=True),
    _case("cat-rows-buffer", lambda y, c, z: torch.cat([y, _ROWS.view([-1 if i == c else 2 if i == 0 else 1
                                                                        for i in range(y.dim())]).expand(
        *[s if i else 2 for i, s in enumerate(y.shape)])], 0), "fix"),
    _case("cat-channels-zeros_like", lambda y, c, z: torch.cat([y, torch.zeros_like(y)], c), "cut"),
    _case("cat-channels-ones_like", lambda y, c, z: torch.cat([y, torch.ones_like(y)], c), "cut", zero=False),
    _case("cat-channels-full_like", lambda y, c, z: torch.cat([torch.full_like(y, 0.0), y], c), "cut"),
    _case("cat-channels-new_zeros", lambda y, c, z: torch.cat([y, y.new_zeros(
        *[3 if i == c else s for i, s in enumerate(y.shape)])], c), "cut"),
    _case("cat-channels-new_ones", lambda y, c, z: torch.cat([y.new_ones(
        *[2 if i == c else s for i, s in enumerate(y.shape)]), y], c), "cut", zero=False),
    _case("cat-rows-new_full-new_empty", lambda y, c, z: torch.cat([y, y.new_full(y[:1].shape, 0.0),
                                                                    y.new_empty(y[:1].shape).fill_(0.0)], 0), "cut"),
    _case("mul-new_tensor", lambda y, c, z: y * y.new_tensor(2.0), "cut"),
    _case("stack-last", lambda y, c, z: torch.stack([y, y], -1).sum(-1)),
    _case("hstack", lambda y, c, z: torch.hstack([y, z]), two=True),
    _case("vstack", lambda y, c, z: torch.vstack([y, z]), "cut", two=True),
    _case("cat-then-slice", lambda y, c, z: _ch(torch.cat([y, z], c), c, slice(y.shape[c], None)), "cut", two=True),
    _case("cat-then-split", lambda y, c, z: torch.cat([y, z], c).split([y.shape[c], z.shape[c]], c)[1], two=True),
    # a literal bound (6, y's width) stays where it is while the cut moves the channels before it (or, counted from
    # the end, after it); the graph took a bound at a boundary of the concatenation for one that follows the cut
    # (the cut model failed, or gave another output). A width read off the channels follows them: one of other
    # channels (z.shape[c] where y's boundary is) couples them with those before the bound
    _case("cat-then-slice-literal", lambda y, c, z: _ch(torch.cat([y, z], c), c, slice(6, None)), "fix", two=True),
    _case("cat-then-slice-literal-head", lambda y, c, z: _ch(torch.cat([y, z], c), c, slice(None, 6)), "fix",
          two=True),
    _case("cat-then-slice-literal-both", lambda y, c, z: _ch(torch.cat([y, z, y], c), c, slice(6, 12)), "fix",
          two=True),
    _case("cat-then-slice-from-the-end", lambda y, c, z: _ch(torch.cat([y, z], c), c, slice(-6, None)), "cut",
          two=True),
    _case("cat-then-slice-head-from-the-end", lambda y, c, z: _ch(torch.cat([y, z], c), c, slice(None, -6)), "cut",
          two=True),
    _case("cat-then-slice-by-the-others-width", lambda y, c, z: _ch(torch.cat([y, z], c), c, slice(z.shape[c], None)),
          "cut", two=True),
    _case("cat-then-slice-by-its-width-past-the-end", lambda y, c, z: _ch(
        torch.cat([y, z], c), c, slice(y.shape[c], y.shape[c] + z.shape[c])), two=True),
    _case("cat-then-narrow-literal", lambda y, c, z: torch.cat([y, z], c).narrow(c, 6, 6), "fix", two=True),
    _case("cat-then-split-literal", lambda y, c, z: torch.cat([y, z], c).split([6, 6], c)[1], "fix", two=True),
    _case("cat-then-chunk", lambda y, c, z: torch.cat([y, z], c).chunk(2, c)[1], "fix", two=True),
    # a width as a slice bound elsewhere (on the rows, on a tensor of no channels) was seen by no rule: a slice is
    # no pytree node, its bounds no arguments; the rows or the columns taken changed with the cut
    _case("getitem-rows-by-its-width", lambda y, c, z: y[:y.shape[c] - 3], "fix"),
    _case("cat-ones-sliced-by-its-width", lambda y, c, z: torch.cat([y, _ch(torch.ones(
        [20 if i == c else n for i, n in enumerate(y.shape)]), c, slice(None, y.shape[c]))], c), "fix"),
    _case("cat-then-index_select-literal", lambda y, c, z: torch.cat([y, z], c).index_select(
        c, torch.arange(6, 12)), "fix", two=True),
    # indexing
    _case("getitem-rows", lambda y, c, z: y[1:3], "cut"),
    _case("getitem-row", lambda y, c, z: y[0], "cut", on="nc nlc"),
    _case("getitem-last-row", lambda y, c, z: y[-1], "cut", on="nc nlc"),
    _case("getitem-whole", lambda y, c, z: y[(slice(None),) * (c + 1)], "cut"),
    _case("getitem-ellipsis", lambda y, c, z: _ch(y, c, slice(None)) if c == 1 else y[..., :], "cut"),
    _case("getitem-none", lambda y, c, z: y[None][0], "cut"),
    _case("getitem-none-second", lambda y, c, z: y[:, None].squeeze(1), "cut"),
    _case("getitem-ellipsis-none", lambda y, c, z: y[..., None].squeeze(-1), "cut"),
    _case("getitem-index-rows", lambda y, c, z: y[torch.tensor([1, 0])], "cut"),
    _case("getitem-list-rows", lambda y, c, z: y[[1, 0]], "cut"),
    _case("getitem-bool-rows", lambda y, c, z: y[torch.arange(y.shape[0]) > 0], "cut"),
    _case("getitem-2d-index-rows", lambda y, c, z: y[torch.tensor([[0, 1], [1, 0]])].sum(0), "cut"),
    _case("getitem-int-and-index", lambda y, c, z: y[0, :, torch.tensor([0, 1, 2])].t() if c == 1 and y.dim() == 3
          else y, "cut"),
    _case("getitem-channel-slice", lambda y, c, z: _ch(y, c, slice(1, 4)), "fix"),
    _case("getitem-channel-head", lambda y, c, z: _ch(y, c, slice(None, 3)), "fix"),
    _case("getitem-channel-step", lambda y, c, z: _ch(y, c, slice(None, None, 2)), "fix"),
    _case("getitem-channel", lambda y, c, z: y * _ch(y, c, slice(0, 1)), "fix"),
    _case("getitem-channel-int", lambda y, c, z: _ch(y, c, 0), "fix"),
    _case("getitem-channel-index", lambda y, c, z: _ch(y, c, torch.tensor([0, 2, 4])), "fix"),
    _case("getitem-channel-reversed", lambda y, c, z: _ch(y, c, torch.arange(y.shape[c] - 1, -1, -1)), "fix"),
    _case("getitem-channel-bool", lambda y, c, z: _ch(y, c, torch.arange(y.shape[c]) != 1), "fix"),
    _case("getitem-2d-bool", lambda y, c, z: y * y[y > 0].sum(), "fix"),
    # ops that mix channels by name
    *[_case(f"mix-{n}", f, "fix") for n, f in [
        ("matmul", lambda y, c, z: y.movedim(c, -1) @ torch.ones(6, 6)),
        ("mm", lambda y, c, z: torch.mm(_rows(y, c), torch.ones(6, 6))),
        ("bmm", lambda y, c, z: torch.bmm(_rows(y, c)[None], torch.ones(1, 6, 6))[0]),
        ("einsum", lambda y, c, z: torch.einsum("...c,cd->...d", y.movedim(c, -1), torch.ones(6, 6))),
        ("linear", lambda y, c, z: _F.linear(y.movedim(c, -1), torch.ones(6, 6))),
        ("bilinear", lambda y, c, z: _F.bilinear(_rows(y, c), _rows(y, c), torch.ones(2, 6, 6))),
        ("conv1d", lambda y, c, z: _F.conv1d(_rows(y, c).t()[None], torch.ones(6, 6, 1))[0].t()),
        ("conv2d", lambda y, c, z: _F.conv2d(_rows(y, c).t()[None, ..., None], torch.ones(6, 6, 1, 1))[0, ..., 0].t()),
        ("conv3d", lambda y, c, z: _F.conv3d(_rows(y, c).t()[None, ..., None, None],
                                             torch.ones(6, 6, 1, 1, 1))[0, ..., 0, 0].t()),
        ("conv_transpose1d", lambda y, c, z: _F.conv_transpose1d(_rows(y, c).t()[None], torch.ones(6, 6, 1))[0].t()),
        ("conv_transpose2d", lambda y, c, z: _F.conv_transpose2d(_rows(y, c).t()[None, ..., None],
                                                                 torch.ones(6, 6, 1, 1))[0, ..., 0].t()),
        ("conv_transpose3d", lambda y, c, z: _F.conv_transpose3d(_rows(y, c).t()[None, ..., None, None],
                                                                 torch.ones(6, 6, 1, 1, 1))[0, ..., 0, 0].t()),
        ("tensordot", lambda y, c, z: torch.tensordot(_rows(y, c), torch.ones(6, 6), dims=([1], [0]))),
        ("addmm", lambda y, c, z: torch.addmm(torch.zeros(6), _rows(y, c), torch.ones(6, 6))),
        ("baddbmm", lambda y, c, z: torch.baddbmm(torch.zeros(6), _rows(y, c)[None], torch.ones(1, 6, 6))[0]),
        ("addmv", lambda y, c, z: torch.addmv(torch.zeros(_rows(y, c).shape[0]), _rows(y, c), torch.ones(6))),
        ("mv", lambda y, c, z: torch.mv(_rows(y, c), torch.ones(6))),
        ("outer", lambda y, c, z: torch.outer(_rows(y, c)[0], torch.ones(2))),
        ("inner", lambda y, c, z: torch.inner(_rows(y, c), torch.ones(3, 6))),
        ("dot", lambda y, c, z: y * torch.dot(_rows(y, c)[0], _rows(y, c)[1])),
        ("kron", lambda y, c, z: torch.kron(y, torch.ones([1] * y.dim()))),
        ("layer_norm", lambda y, c, z: _F.layer_norm(y.movedim(c, -1), (6,)).movedim(-1, c)),
        ("rms_norm", lambda y, c, z: _F.rms_norm(y.movedim(c, -1), (y.shape[c],)).movedim(-1, c)),
        ("group_norm", lambda y, c, z: _F.group_norm(_ch1(y, c), 2).movedim(1, c)),
        ("batch_norm", lambda y, c, z: _F.batch_norm(_ch1(y, c), torch.zeros(6), torch.ones(6)).movedim(1, c)),
        ("local_response_norm", lambda y, c, z: _F.local_response_norm(_ch1(y, c)[..., None], 3, 1.0)[..., 0]),
        ("channel_shuffle", lambda y, c, z: _F.channel_shuffle(_ch1(y, c)[..., None], 2)[..., 0].movedim(1, c)),
        ("native_channel_shuffle", lambda y, c, z: torch.native_channel_shuffle(_ch1(y, c)[..., None], 3)[..., 0]),
        ("pixel_shuffle", lambda y, c, z: _F.pixel_shuffle(_ch1(y, c)[..., None, None], 1)[..., 0, 0]),
        ("pixel_unshuffle", lambda y, c, z: _F.pixel_unshuffle(_ch1(y, c)[..., None, None], 1)[..., 0, 0]),
        ("cdist", lambda y, c, z: torch.cdist(_rows(y, c).t(), _rows(y, c).t())),
        ("cross", lambda y, c, z: torch.cross(_rows(y, c).t()[:3], _rows(y, c).t()[3:], dim=0)),
        ("take", lambda y, c, z: torch.take(y, torch.arange(6))),
        ("put", lambda y, c, z: y.clone().put_(torch.tensor([1]), torch.tensor([0.0]))),
        ("diag", lambda y, c, z: torch.diag(_rows(y, c)[0])),
        ("diag_embed", lambda y, c, z: torch.diag_embed(_rows(y, c))[:, 1]),
        ("diagflat", lambda y, c, z: torch.diagflat(_rows(y, c)[0])),
        ("diagonal", lambda y, c, z: y * _rows(y, c).t().diagonal()[:1].sum()),
        ("trace", lambda y, c, z: y * torch.trace(_rows(y, c).t())),
        ("as_strided", lambda y, c, z: torch.as_strided(_rows(y, c), _rows(y, c).shape, (1, _rows(y, c).shape[0]))),
    ]],
    _case("mix-matmul-rows", lambda y, c, z: torch.ones(y.shape[0], y.shape[0]) @ y.movedim(0, -2)),
    _case("mix-instance_norm", lambda y, c, z: _F.instance_norm(_ch1(y, c)[..., None] * torch.arange(2.0))[..., 1]),
    _case("mix-embedding", lambda y, c, z: _F.embedding(torch.tensor([1, 0]), _rows(y, c))),
]


@pytest.mark.parametrize("op, expect, layouts, two, zero", _CATALOGUE)
def test_an_op_between_two_layers_is_cut_as_masked(op, expect, layouts, two, zero):
    """Every group the graph calls cuttable, cut, computes what it does
    masked (dropping channel 1, then channels 0 and size - 2); the
    producer's channels are cuttable or fixed where the op leaves no doubt."""
    for layout in layouts:
        net = _OpNet(layout, op, two).eval()
        x = torch.randn(_LAYOUTS[layout][0], generator=torch.Generator().manual_seed(1))
        graph = G.DependencyGraph(net, x)
        if expect is not None:
            assert ("a" in [g.name for g in graph.groups]) == (expect == "cut"), (layout, graph.fixed_groups)
        assert _cut_mismatches(net, x, consumers=True) == [], layout
        if zero:
            assert _cut_mismatches(net, x) == [], layout


def test_the_catalogue_runs_every_op_the_graph_has_a_rule_for():
    """Every name in the tracer's rule sets is run by a case of the
    catalogue above (on its first layout): a rule with no case is one that
    nothing checks."""
    from torch.overrides import TorchFunctionMode
    from pointsparse.prune import _trace

    seen = set()

    class Names(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.add(_trace._name(func))
            return func(*args, **(kwargs or {}))

    for case in _CATALOGUE:
        op, _, layouts, two, _ = case.values
        net = _OpNet(layouts[0], op, two)
        with Names(), torch.no_grad():
            net(torch.randn(_LAYOUTS[layouts[0]][0]))
    sets = ("_MIX", "_REDUCE", "_ALONG", "_SHAPE", "_PERMUTE", "_CAT", "_NORMS", "_DIM_THIRD", "_IMPLIED", "_PAD",
            "_LIKE", "_FACTORIES", "_KEEPDIM_FOURTH", "_SIZED", "_READS")
    assert sorted(set().union(*(getattr(_trace, n) for n in sets)) - seen) == []


@pytest.mark.parametrize("op, cuttable", [
    (lambda y: y.gather(0, (torch.arange(y.shape[1]) % 5)[None]), False),  # (row k % 5 for channel k)
    (lambda y: torch.zeros_like(y).scatter_add(0, torch.tensor([[0, 1, 2, 3, 4, 0]]), y[:1]), False),
    (lambda y: y.gather(0, torch.tensor([[3], [1]]).expand(-1, y.shape[1])), True),  # (the same rows for every channel)
    (lambda y: torch.take_along_dim(y, torch.tensor([[4], [0]]), 0), True),
])
def test_an_index_that_differs_from_channel_to_channel_fixes_them(op, cuttable):
    """The index of gather or scatter along the rows names a row for each
    channel: where it differs from channel to channel it is data of each
    channel, which the cut moves to other channels; the graph let every
    integer index pass, so gather(y, 0, index by channel) left the channels
    cuttable (another output). An index that is the same for every channel
    (expanded over them) still does."""
    net, x = _Between(op), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == (["a"] if cuttable else []), graph.fixed_groups
    assert _cut_mismatches(net, x) == []


class _Elsewhere(nn.Module):
    """``a = Conv3d(3, 6) -> BatchNorm -> op (channels to 6) -> o = Conv3d(6, 2, 1)``."""

    def __init__(self, op):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.bn, self.o = ps.nn.Conv3d(3, 6, 3), ps.nn.BatchNorm(6), ps.nn.Conv3d(6, 2, 1)
        self.b = op()

    def forward(self, x):
        h = self.bn(self.a(x))
        if isinstance(self.b, ps.nn.Conv3d):  # (its weight used by the functional conv; the module never runs)
            return self.o(ps.nn.functional.conv3d(h, self.b.weight, 3))
        if isinstance(self.b, ps.formats.SparseLinear):
            return self.o(h.with_feats(self.b(h.feats)))
        return self.o(self.b(h))


def _compressed_linear(execution):
    layer = ps.formats.compress(nn.Linear(6, 6), "csr")
    layer.execution = execution
    return layer


def _compressed_conv(execution):
    layer = ps.formats.compress(ps.nn.Conv3d(6, 6, 3), "csr")
    layer.execution = execution
    return layer


@pytest.mark.parametrize("op", [
    lambda: ps.nn.Conv3d(6, 6, 3),
    lambda: _compressed_conv("format"),
    lambda: _compressed_conv("engine"),
    lambda: _compressed_linear("format"),
], ids=["functional-conv", "compressed-format", "compressed-engine", "compressed-linear"])
def test_channels_that_leave_torch_for_the_core_are_fixed(op):
    """Channels handed to the C++ core as numpy arrays (the engine's conv of
    a weight no registered layer runs, a compressed layer's format or
    engine) are used there in ways the graph does not see: it left them
    cuttable, and the cut model (the weight there uncut) raised 'input has 4
    channels; this conv takes 6'. They are fixed, as a layer without an
    adapter fixes its input's."""
    net, x = _Elsewhere(op).eval(), sparse_input(n=120, channels=3)
    graph = G.DependencyGraph(net, x)
    assert graph.groups == [], [g.name for g in graph.groups]
    assert "leave torch" in graph.fixed_groups[0].fixed and graph.fixed_groups[0].name == "a"
    assert G.prune_model(net, x, 0.5, multiple=1) == {}
    with torch.no_grad():
        assert net(x).feats.shape == (len(x), 2)


def test_a_compressed_linear_run_dense_keeps_its_channels():
    """A compressed Linear run as torch's linear on the weight its format
    holds (formats.compress's default) is a linear on a buffer, no
    adapter's layer: its input's channels are fixed, the model left whole."""
    net, x = _Elsewhere(lambda: _compressed_linear("dense")).eval(), sparse_input(n=120, channels=3)
    graph = G.DependencyGraph(net, x)
    assert graph.groups == [] and graph.fixed_groups[0].name == "a"
    assert G.prune_model(net, x, 0.5, multiple=1) == {}
    with torch.no_grad():
        assert net(x).feats.shape == (len(x), 2)


def _compressed_chain():
    torch.manual_seed(0)
    net = nn.Sequential(ps.nn.Conv3d(3, 8, 3), ps.nn.BatchNorm(8), ps.nn.ReLU(), ps.nn.Conv3d(8, 4, 3)).eval()
    return ps.formats.compress(net, "csr"), sparse_input(n=60, channels=3)


@pytest.mark.parametrize("entry", ["graph", "prune_model", "prune_channels", "channel_groups", "chain_cut",
                                   "chain_ratios"])
def test_a_model_compressed_whole_is_refused_by_channel_pruning(entry):
    """A model whose every layer formats.compress turned into a compressed
    layer holds no weight parameter the graph can cut: DependencyGraph found
    no group, prune_model returned {} and prune_channels cut nothing, with
    no word. Each refuses it naming the compressed layers (cut, then
    compress), and leaves the model as it was; surgery's chain cuts by a
    producer's name too (they said "'0' is not a producer layer", no word
    of the compression)."""
    from pointsparse.prune import surgery, workflow

    net, x = _compressed_chain()
    with torch.no_grad():
        before = net(x).feats
    call = {"graph": lambda: G.DependencyGraph(net, x), "prune_model": lambda: G.prune_model(net, x, 0.5),
            "prune_channels": lambda: workflow.prune_channels(net, x, 0.5),
            "channel_groups": lambda: surgery.channel_groups(net),
            "chain_cut": lambda: surgery.prune_channels(net, "0", [0, 1, 2, 3]),
            "chain_ratios": lambda: surgery.apply_channel_ratios(net, {"0": 0.5})}[entry]
    with pytest.raises(ValueError, match=r"'0', '3'.*compressed.*before compress"):
        call()
    with torch.no_grad():
        assert torch.equal(net(x).feats, before)


def test_a_compressed_layer_alone_is_refused_by_the_graph():
    layer, x = ps.formats.compress(ps.nn.Conv3d(3, 4, 3), "csr"), sparse_input(n=60, channels=3)
    with pytest.raises(ValueError, match="model is a compressed layer.*before compress"):
        G.DependencyGraph(layer, x)


class _RootParameters(nn.Module):
    """A sparse chain whose own forward uses parameters of the root: a
    learned output scale (a number) and, with ``gate``, a gate on the
    channels of ``b``'s output."""

    def __init__(self, gate: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.bn = ps.nn.Conv3d(3, 6, 3), ps.nn.BatchNorm(6)
        self.b, self.o = ps.nn.Conv3d(6, 8, 3), ps.nn.Conv3d(8, 2, 1)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.gate = nn.Parameter(torch.rand(8)) if gate else None

    def forward(self, x):
        h = self.b(self.bn(self.a(x)))
        if self.gate is not None:
            h = h.with_feats(h.feats * self.gate)
        y = self.o(h)
        return y.with_feats(y.feats * self.scale)


@pytest.mark.parametrize("gate", [False, True], ids=["scale", "gated-channels"])
def test_a_root_with_parameters_of_its_own_is_traced(gate):
    """The model itself was taken for a layer without an adapter where it
    held a parameter of its own (a learned scale): the whole forward ran
    inside that opaque layer and the graph found no group at all, not even
    a fixed one. Its forward is traced as any root's: the layers' groups
    are found, a parameter along some channels fixes those (the gate), and
    the cut computes what the masked model computes."""
    net, x = _RootParameters(gate).eval(), sparse_input(n=120, channels=3)
    _randomize_norms(net)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == (["a"] if gate else ["a", "b"])
    assert [g.name for g in graph.fixed_groups] == (["b", "o"] if gate else ["o"])
    keep = G.plan(graph, 0.5, multiple=1)
    masked = copy.deepcopy(net)
    G.DependencyGraph(masked, x).mask(keep)
    graph.cut(keep)
    with torch.no_grad():
        torch.testing.assert_close(net(x).feats, masked(x).feats, rtol=1e-5, atol=1e-6)
    assert net.a.weight.shape == (27, 3, 3) and net.b.weight.shape[1] == 3


class _Tied(nn.Module):
    """a -> b -> c -> d -> h with c's weight b's Parameter (tied layers), or
    with ``root``, a weight the model's forward also reads itself."""

    def __init__(self, root=False):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c, self.d, self.h = (nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 6),
                                                  nn.Linear(6, 2))
        self.root = root
        if not root:
            self.c.weight = self.b.weight

    def forward(self, t):
        y = torch.relu(self.b(torch.relu(self.a(t))))
        y = torch.relu(self.c(y)) if not self.root else torch.relu(y @ self.b.weight.t())
        return self.h(torch.relu(self.d(y)))


@pytest.mark.parametrize("root", [False, True], ids=["two-layers", "read-by-the-forward"])
def test_a_weight_shared_between_layers_fixes_their_channels(root):
    """Two layers holding one Parameter (tied weights) were cut apart: each
    got its own sliced copy, so the tie was silently gone (the cut model
    trained two weights) and a plan cut the layers' channels as though they
    were free. A layer whose weight another module or the forward reads
    has its channels fixed, with the reason; the other groups are cut
    (read by the forward, ``y @ b.weight.t()``: the cut model failed)."""
    net, x = _Tied(root).double().eval(), torch.randn(10, 4, dtype=torch.float64)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == ["d"]
    reasons = {g.name: g.fixed for g in graph.fixed_groups}
    assert {"a", "b"} <= set(reasons)
    assert ("b: its 'weight' is read outside it, by t" if root else "'weight' is shared with c.weight") in reasons["a"]
    keep = G.plan(graph, 0.5, multiple=1)
    graph.mask(keep)
    with torch.no_grad():
        masked = net(x)
        graph.cut(keep)
        torch.testing.assert_close(net(x), masked, rtol=1e-12, atol=1e-12)
    assert net.d.out_features == 3 and (root or net.c.weight is net.b.weight)


def test_a_residual_written_with_plus_couples_its_operands():
    """x + y of two SparseTensors (nn.add) couples the two operands' channels,
    as a residual block needs: cutting one without the other would not add."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = ps.nn.Conv3d(3, 8, 3)
            self.b = ps.nn.Conv3d(8, 8, 3)
            self.skip = ps.nn.Conv3d(3, 8, 1)
            self.head = ps.nn.Conv3d(8, 2, 1)

        def forward(self, x):
            return self.head(self.b(self.a(x)) + self.skip(x))

    g = torch.Generator().manual_seed(0)
    xyz = torch.unique(torch.randint(0, 6, (60, 3), generator=g), dim=0)
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1).int()
    x = ps.SparseTensor(torch.randn(len(coords), 3, generator=g), coords)
    model = Block().eval()
    graph = G.DependencyGraph(model, x)
    coupled = [g for g in graph.groups if {("b", "out"), ("skip", "out")} <= {(m.module, m.role) for m in g.members}]
    assert len(coupled) == 1


class _Aliased(nn.Module):
    """a -> b -> h where ``b`` is registered a second time as ``last``
    (one module under two names, as ``self.head = self.layers[-1]``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU())
        self.h = nn.Linear(6, 2)
        self.last = self.layers[2]

    def forward(self, t):
        return self.h(self.layers(t))


def test_a_module_registered_under_two_names_is_no_tied_layer():
    """The check for tied weights took a module registered twice (an alias:
    one module, one weight, two names) for two modules sharing a weight and
    fixed its channels ("its 'weight' is shared with last.weight"), where
    the cut, slicing that one module, is exact as before. Its groups are
    cut; a weight held by another module stays fixed (the test above)."""
    net, x = _Aliased().double().eval(), torch.randn(10, 4, dtype=torch.float64)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == ["layers.0", "layers.2"]
    keep = G.plan(graph, 0.5, multiple=1)
    with torch.no_grad():
        masked = copy.deepcopy(net)
        G.DependencyGraph(masked, x).mask(keep)
        graph.cut(keep)
        torch.testing.assert_close(net(x), masked(x), rtol=1e-12, atol=1e-12)
    assert net.last is net.layers[2] and net.last.out_features == 3


@pytest.mark.parametrize("keep", [[[0, 1], [2, 3]], torch.tensor([[0, 1]])])
def test_keep_of_more_than_one_dimension_is_refused(keep):
    """keep given as a 2-D list was flattened silently: a list of lists meant
    for several groups cut one group to their union."""
    model = MinkUNet(4, 3, cr=0.125, blocks=1).eval()
    g = torch.Generator().manual_seed(0)
    xyz = torch.unique(torch.randint(0, 8, (80, 3), generator=g), dim=0)
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1).int()
    graph = G.DependencyGraph(model, ps.SparseTensor(torch.randn(len(coords), 4, generator=g), coords))
    with pytest.raises(ValueError, match="keep for group .* must be a flat sequence of channel indices"):
        graph.mask({0: keep})
    with pytest.raises(ValueError, match="keep for group .* must be a flat sequence of channel indices"):
        graph.cut({0: keep})


def test_tracing_leaves_each_module_in_its_own_mode():
    """The trace runs the model in eval mode, then restored it with
    model.train(was), which puts every module in the model's mode: a
    BatchNorm frozen in eval mode while the rest trains (fine-tuning with
    frozen statistics) was left training, its statistics updated again."""
    net = _minkunet().train()
    frozen = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)][:3]
    for m in frozen:
        m.eval()
    modes = {id(m): m.training for m in net.modules()}
    G.DependencyGraph(net, sparse_input(n=600, extent=12))
    assert {id(m): m.training for m in net.modules()} == modes


class _InstanceNet2d(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.norm(self.conv1(x))))


@pytest.mark.parametrize("which", ["sparse", "torch"])
def test_instance_norms_channels_are_cut_with_their_producer(which):
    """An InstanceNorm (pointsparse.nn's, torch's InstanceNorm2d) had no
    adapter: the dependency graph fixed its channels, so the conv before it
    could not be cut at all. It is a channel-wise norm now, as BatchNorm
    is: cut with the conv that feeds it, exact against the masked model."""
    if which == "sparse":
        torch.manual_seed(0)
        net = nn.Sequential(ps.nn.Conv3d(3, 8, 3), ps.nn.InstanceNorm(8), ps.nn.ReLU(), ps.nn.Conv3d(8, 4, 3))
        x, out, norm = sparse_input(n=300, extent=8), (lambda y: y.feats), "1"
    else:
        net, x, out, norm = _InstanceNet2d(), torch.randn(2, 3, 10, 10), (lambda y: y), "norm"
    with torch.no_grad():
        getattr(net, norm).weight.uniform_(0.5, 1.5)
        getattr(net, norm).bias.uniform_(-0.3, 0.3)
    graph = G.DependencyGraph(net, x)
    assert not graph.fixed_groups or all(norm not in g.modules("out") for g in graph.fixed_groups)
    keep = G.plan(graph, 0.5)
    assert sum(len(v) for v in keep.values()) < 8
    graph.mask(keep)
    with torch.no_grad():
        masked = out(net(x))
    graph.cut(keep)
    with torch.no_grad():
        cut = out(net(x))
    assert getattr(net, norm).weight.shape == (4,) and getattr(net, norm).num_features == 4
    torch.testing.assert_close(cut, masked, rtol=1e-5, atol=1e-6)


class _SqueezeExcite2d(nn.Module):
    """conv -> squeeze-excitation (pool, Linear, ReLU, Linear, sigmoid, back
    to (b, c, 1, 1) by ``back``) -> x * s -> conv."""

    def __init__(self, back: str, c: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.back, self.c = back, c
        self.conv1, self.conv2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(c, 4), nn.Linear(4, c)
        self.unflatten = nn.Unflatten(1, (c, 1, 1))

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        if self.back == "nn.Unflatten":
            s = self.unflatten(s)
        elif self.back == "view-literal":
            s = s.view(len(s), self.c, 1, 1)
        elif self.back == "reshape-literal":
            s = s.reshape(-1, self.c, 1, 1)
        elif self.back == "expand-literal":
            s = s[:, :, None, None].expand(-1, self.c, *x.shape[2:])
        elif self.back == "view-of-its-shape":
            s = s.view(*s.shape, 1, 1)
        else:  # "view-inferred"
            s = s.view(len(s), -1, 1, 1)
        return self.conv2(x * s)


@pytest.mark.parametrize("back,cuttable", [("nn.Unflatten", False), ("view-literal", False),
                                           ("reshape-literal", False), ("expand-literal", False),
                                           ("view-of-its-shape", True), ("view-inferred", True)])
def test_a_size_written_as_a_number_fixes_the_channels_it_sizes(back, cuttable):
    """A squeeze-excitation gate brought back to (b, c, 1, 1) by sizes held
    as plain numbers (nn.Unflatten(1, (c, 1, 1)), view(b, self.c, 1, 1)):
    the graph coupled conv1's channels through it and cut them, and the cut
    model failed in torch ("unflatten: Provided sizes [8, 1, 1] don't
    multiply up to the size of dim 1 (4)"). A number no cut changes fixes
    the channels it sizes; sizes read off the tensor or inferred (-1) follow
    the cut, exact against the masked model."""
    net, x = _SqueezeExcite2d(back), torch.randn(2, 3, 6, 6)
    graph = G.DependencyGraph(net, x)
    conv1 = [g for g in graph.groups if "conv1" in g.modules("out")]
    assert bool(conv1) == cuttable
    if not cuttable:
        assert any("conv1" in g.modules("out") for g in graph.fixed_groups)
        return
    keep = G.plan(graph, 0.5)
    graph.mask(keep)
    with torch.no_grad():
        masked = net(x)
    graph.cut(keep)
    assert net.conv1.out_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(net(x), masked, rtol=1e-5, atol=1e-6)


def test_a_stale_graph_refuses_to_cut_or_mask():
    """A graph whose model was cut since its trace (cut(retrace=False), then
    another cut; or a cut through another graph or surgery) cut by the widths
    it had traced: keeping channels 5 and 6 of a group cut to 4 kept none
    (every weight of the layer 0 wide) and the model failed at its next
    forward in torch ("index 0 out of range"), or kept other channels than
    asked. It refuses now, naming the layer and both widths, before
    anything changes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(),
                        nn.Linear(6, 2)).eval()
    x = torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    graph.cut({"0": [0, 1, 2, 3]}, retrace=False)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for call in (lambda: graph.cut({"0": [5, 6]}), lambda: graph.mask({"0": [5, 6]}),
                 lambda: graph.cut({"3": [0, 1]})):
        with pytest.raises(ValueError, match=r"stale.*'0' has 4 output channels.*traced with 8"):
            call()
        assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    other = G.DependencyGraph(net, x)  # (a fresh trace cuts; a cut through it makes the first stale again)
    other.cut({"3": [0, 2, 4]})
    assert net(x).shape == (5, 2) and net[3].out_features == 3


def test_a_group_object_names_its_group_in_keep_and_only_its_own_graphs():
    """cut's keep names a group 'by index, name or object', but a
    CoupledGroup was unhashable (a dataclass with field equality): {group:
    keep} was Python's bare "unhashable type: 'CoupledGroup'". And
    graph.group took any CoupledGroup as it was, one of another graph or of
    this graph before a cut retraced it, whose members and size are not
    the model's. A group object is hashable now (by identity); one that is
    not among the graph's groups is a ValueError naming it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    first, second = graph.groups
    keep = G.plan(graph, {first: 0.5}, multiple=1)
    graph.mask(keep)
    graph.cut({first: keep[first]})
    assert net[0].out_features == 4 and net[2].in_features == 4
    for stale in (first, second, G.DependencyGraph(copy.deepcopy(net), x).groups[0]):
        with pytest.raises(ValueError, match="not one of this graph's groups"):
            graph.cut({stale: [0, 1]})
    assert net[0].out_features == 4 and net[2].out_features == 6
    graph.cut({graph.groups[1]: [0, 1, 2]})
    assert net[2].out_features == 3 and net(x).shape == (5, 2)


@pytest.mark.parametrize("norm", [
    lambda c: nn.BatchNorm1d(c, affine=False),  # running statistics, no weight
    lambda c: nn.BatchNorm1d(c, affine=False, track_running_stats=False),  # nothing but num_features
])
def test_widths_record_a_norm_without_affine_parameters(norm):
    """widths() skipped a norm without a weight (affine=False), so a cut
    model's checkpoint rebuilt with resize() kept it at full width: its
    running statistics did not load ("size mismatch for 1.running_mean"),
    or, with none, num_features stayed and the forward refused the narrower
    input. It records every norm's width now; the rebuilt model computes
    what the cut one computes."""
    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Linear(4, 8), norm(8), nn.ReLU(), nn.Linear(8, 3))

    x = torch.randn(6, 4)
    net = make()
    if isinstance(net[1].running_mean, torch.Tensor):
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    G.DependencyGraph(net, x).cut({"0": [0, 2, 5]})
    recorded = G.widths(net)
    assert recorded["1"] == {"out": 3}
    fresh = make()
    G.resize(fresh, recorded)
    fresh.load_state_dict(net.state_dict())
    fresh.eval()
    assert fresh[1].num_features == 3
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x))


class _AuxHead(nn.Module):
    """An auxiliary head that runs in training mode only."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.aux = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return (self.b(h), self.aux(h)) if self.training else self.b(h)


def test_a_cut_names_the_layers_its_trace_never_ran():
    """The graph traces in eval mode: a head that runs in training only was
    no member of any group, and a cut left its inputs at full width without
    a word; the next training step failed in torch ("mat1 and mat2 shapes
    cannot be multiplied (5x4 and 8x3)"). The cut warns, naming the layers
    the trace never ran; a model whose every layer ran cuts quietly."""
    import warnings

    torch.manual_seed(0)
    net, x = _AuxHead().train(), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    with pytest.warns(UserWarning, match=r"\['aux'\] did not run in the traced forward"):
        graph.cut({"a": [0, 1, 2, 3]})
    assert net.a.out_features == 4 and net.aux.in_features == 8
    quiet = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        G.DependencyGraph(quiet, x).cut({"0": [0, 1, 2, 3]})


class _LogitsOut:
    """A model's output object of its own (no pytree node): its tensors are attributes."""

    def __init__(self, logits):
        self.logits = logits


class _DictOut(dict):
    """A dict subclass (as a ModelOutput), which torch's pytree takes for a leaf."""


def _dataclass_out(logits):
    import dataclasses

    return dataclasses.make_dataclass("Out", [("logits", torch.Tensor)])(logits)


class _WrappedOutput(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        torch.manual_seed(0)
        self.wrap = wrap
        self.a, self.cls = nn.Linear(4, 8), nn.Linear(8, 6)

    def forward(self, x):
        return self.wrap(self.cls(torch.relu(self.a(x))))


@pytest.mark.parametrize("wrap", [_dataclass_out, lambda y: _DictOut(logits=y), _LogitsOut,
                                  lambda y: {"out": [_LogitsOut(y)]}],
                         ids=["dataclass", "dict-subclass", "object", "nested"])
def test_a_network_output_held_by_an_object_keeps_its_classes(wrap):
    """torch's pytree takes a dataclass, a dict subclass (a ModelOutput) or
    any object for a leaf: the logits it holds were no network output, the
    classifier's classes a cuttable group, and prune_channels cut half the
    classes away without a word. Tensors inside such outputs are outputs."""
    from pointsparse.prune import workflow

    net, x = _WrappedOutput(wrap).eval(), torch.randn(5, 4)
    graph = G.DependencyGraph(net, x)
    assert [g.name for g in graph.groups] == ["a"]
    assert [(g.name, g.fixed) for g in graph.fixed_groups] == [("cls", "network output")]
    workflow.prune_channels(net, x, 0.5, multiple=1)
    assert net.cls.out_features == 6 and net.a.out_features == 4



class _MixHeld(nn.Linear):
    """A Linear that sums into its input the tensor ``skip`` an object it takes holds."""

    def forward(self, x, ctx):
        return super().forward(x + (ctx["skip"] if isinstance(ctx, dict) else ctx.skip))


class _Held:
    def __init__(self, skip):
        self.skip = skip


class _MixHeldNet(_MixNet):
    def __init__(self, wrap):
        super().__init__()
        self.wrap, self.mix = wrap, _MixHeld(6, 5)

    def forward(self, x):
        h = torch.relu(self.pre(x))
        return self.head(torch.relu(self.mix(self.a(h), self.wrap(self.b(h)))))


def _dataclass_held(skip):
    import dataclasses

    return dataclasses.make_dataclass("Ctx", [("skip", torch.Tensor)])(skip)


@pytest.mark.parametrize("wrap", [_dataclass_held, _Held, lambda t: _DictOut(skip=t)],
                         ids=["dataclass", "object", "dict-subclass"])
def test_channels_an_argument_object_holds_are_fixed(wrap):
    """An argument that torch's pytree takes for a leaf (a dataclass, any
    object, a dict subclass) hid the channels it holds: b's, summed with
    a's inside mix, were cut apart from a's and mix summed other channels
    (the cut model off the masked one by 2e-2, without a word)."""
    net = _MixHeldNet(wrap).eval()
    graph = G.DependencyGraph(net, torch.randn(16, 3))
    assert [g.name for g in graph.groups] == ["pre"]
    assert "passed as its argument 'ctx'" in {g.name: g.fixed for g in graph.fixed_groups}["b"]
    keep = G.plan(graph, 0.5, multiple=1)
    graph.mask(keep)
    masked = net(torch.ones(4, 3)).detach()
    graph.cut(keep)
    assert torch.allclose(net(torch.ones(4, 3)).detach(), masked, atol=1e-6)


def test_kept_count_rounds_once_to_the_multiple_and_ties_keep_more():
    # 16 * 0.74 = 11.84 is 1.48 multiples of 8: 8 channels. It was rounded to 12 first, then 12 / 8 = 1.5 to
    # an even 2 multiples: 16, the whole group, for a plan that asked to remove a quarter of it.
    assert G.kept_count(16, 0.74, 8) == 8
    # A tie between two multiples keeps the larger, whatever the parity: 0.5 of 24 and of 40 kept 16 both
    # (round half to even: 1.5 -> 2 multiples, 2.5 -> 2 multiples).
    assert G.kept_count(24, 0.5, 8) == 16 and G.kept_count(40, 0.5, 8) == 24
    assert G.kept_count(5, 0.5) == 3 and G.kept_count(7, 0.5) == 4  # (ties keep more without a multiple too)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    graph = G.DependencyGraph(net, torch.randn(5, 4))
    assert [len(k) for k in G.plan(graph, 0.74, multiple=8).values()] == [8]


@pytest.mark.parametrize("scope", ["group", "global"])
def test_plan_ignore_keeps_the_channels_the_named_layers_produce(scope):
    """Torch-Pruning's ignored_layers: the layers named (by name or as modules) keep every output channel,
    their input channels following their producers; a global plan ranks the other groups together."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                        nn.Linear(16, 3))
    graph = G.DependencyGraph(net, torch.randn(5, 4))
    full = G.plan(graph, 0.5, scope=scope, multiple=1)
    assert set(full) == {"0", "2", "4"}
    for ignore in (["2"], [net[2]], ("2",)):
        keep = G.plan(graph, 0.5, scope=scope, multiple=1, ignore=ignore)
        assert set(keep) == {"0", "4"}
        assert sum(len(v) for v in keep.values()) == pytest.approx(0.5 * 32, abs=1)
    pruned = G.prune_model(net, torch.randn(5, 4), 0.5, scope=scope, multiple=1, ignore=["2"])
    assert net[2].out_features == 24 and net[2].in_features == pruned["0"] < 16
    with pytest.raises(ValueError, match=r"ignore: 'nope' is no layer of the graph's model"):
        G.plan(graph, 0.5, ignore=["nope"])
    with pytest.raises(ValueError, match=r"ignore: Linear\(in_features=2, .*is no layer of the graph's model"):
        G.plan(graph, 0.5, ignore=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match=r"ignore must be layer names or modules; got int"):
        G.plan(graph, 0.5, ignore=[3])
    with pytest.raises(TypeError, match=r"ignore must be an iterable of layer names or modules; got str"):
        G.plan(graph, 0.5, ignore="2")
    with pytest.raises(ValueError, match=r"keep_ratio names group '0', whose output channels ignore keeps whole .*leave the group out of "
                                         r"keep_ratio, or its layer out of ignore"):
        G.plan(graph, {"0": 0.5}, ignore=["0"])


def test_prune_channels_ignore_keeps_a_layers_outputs():
    from pointsparse.prune.workflow import prune_channels
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 3))
    prune_channels(net, torch.randn(5, 4), 0.5, multiple=1, ignore=[net[2]])
    assert (net[0].out_features, net[2].out_features, net[4].in_features) == (8, 24, 24)


def test_kept_count_ties_keep_more_whatever_the_floats_last_bit():
    """A decimal ratio at a tie keeps the larger count, as kept_count says,
    where the float product falls a last bit short of the tie: 360 x 0.7 is
    251.99999999999997 in floats, 31.5 multiples of 8, and kept 248 (the
    former rounding to a channel first kept 256); 45 x 0.7 kept 31 of 31.5
    channels, as surgery.kept_count did removing 0.3 of 45. Checked against
    exact fractions for every ratio of two decimals."""
    from fractions import Fraction

    from pointsparse.prune import surgery

    assert G.kept_count(360, 0.7, 8) == 256 and G.kept_count(200, 0.58, 8) == 120
    assert G.kept_count(45, 0.7) == 32 and surgery.kept_count(45, 0.3) == 32
    for multiple in (1, 8):
        for size in range(2, 401):
            for p in range(1, 100):
                exact = Fraction(size * p, 100)
                want = max(1, math.floor(exact + Fraction(1, 2)))
                if want < size and multiple > 1 and size > multiple:
                    want = max(multiple, math.floor(exact / multiple + Fraction(1, 2)) * multiple)
                assert G.kept_count(size, p / 100, multiple) == min(want, size), (size, p, multiple)
                if multiple == 1:
                    assert surgery.kept_count(size, 1 - p / 100) == want, (size, p)


def test_plan_ignore_of_a_block_keeps_the_channels_of_every_layer_inside():
    """ignore names a block (a Sequential, MinkUNet's "stem"), as Torch-Pruning's ignored_layers takes one
    for every layer inside it: the block was accepted as a layer of the model and then matched no group
    (the groups hold the layers themselves), so the plan cut the block's channels without a word."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 24), nn.ReLU()),
                        nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))
    graph = G.DependencyGraph(net, torch.randn(5, 4))
    assert set(G.plan(graph, 0.5, multiple=1)) == {"0.0", "0.2", "1"}
    for ignore in (["0"], [net[0]]):
        assert set(G.plan(graph, 0.5, multiple=1, ignore=ignore)) == {"1"}
    G.prune_model(net, torch.randn(5, 4), 0.5, multiple=1, ignore=[net[0]])
    assert (net[0][0].out_features, net[0][2].out_features, net[1].out_features) == (16, 24, 8)


def test_a_global_plan_rounds_its_total_as_kept_count_does():
    # 0.5 of 2 x 5 channels in two groups: 5 in all at a tie of nothing (exact); 0.25 of 10 = 2.5 ties and now
    # keeps 3 (Python's round sent it to an even 2), as a group's kept_count keeps the larger count at a tie.
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2))
    graph = G.DependencyGraph(net, torch.randn(3, 4))
    assert sum(g.size for g in graph.groups) == 10
    assert sum(len(v) for v in G.plan(graph, 0.25, scope="global", multiple=1).values()) == 3
    assert sum(len(v) for v in G.plan(graph, 0.5, scope="global", multiple=1).values()) == 5
