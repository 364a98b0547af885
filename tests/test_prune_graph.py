"""The dependency graph: every coupled channel group found by tracing, cuts
that are exact against the masked model (MinkUNet, SPVCNN, a torch ResNet),
cut networks that still train, BatchNorm shifts folded or refused, user
adapters, importance-driven plans."""

from __future__ import annotations

import copy

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
    assert widths[0][0] == widths[1][0] == 8 and torch.equal(widths[0][1], widths[1][1])


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
    (lambda y: _written(y, slice(None), y, into=lambda y: torch.zeros(5, y.shape[1])), False),  # (not followed)
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
