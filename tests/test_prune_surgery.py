"""Channel surgery: kept outputs unchanged, exactly when the removed channels
contribute nothing; parameter counts shrink; least-squares refit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pointsparse.prune import surgery
from prune_procedures_support import mlp, sparse_chain, sparse_input

pytestmark = pytest.mark.usefixtures("one_thread")

def _zero_inputs_of_consumer(model, group, removed):
    named = dict(model.named_modules())
    consumer = named[group.consumer]
    dim = 1  # Linear / torch conv / pointsparse Conv3d: input channels on axis 1
    with torch.no_grad():
        for c in removed:
            idx = torch.arange(c * group.repeat, (c + 1) * group.repeat) + group.offset
            consumer.weight.index_fill_(dim, idx, 0.0)


@pytest.mark.parametrize("bn", [False, True])
def test_linear_chain_exact_when_removed_channels_are_dead(bn):
    net = mlp(0, bn=bn).eval()
    if bn:
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    groups = surgery.channel_groups(net)
    assert [g.producer for g in groups] == (["0", "3"] if bn else ["0", "2"])
    keep, removed = [0, 2, 5, 9, 15], [c for c in range(16) if c not in (0, 2, 5, 9, 15)]
    _zero_inputs_of_consumer(net, groups[0], removed)
    x = torch.randn(20, 8)
    before = net(x)
    n_before = surgery.count_parameters(net)
    surgery.prune_channels(net, groups[0], keep)
    assert torch.allclose(net(x), before, atol=1e-6)
    # removed: 11 rows of Linear(8,16) + bias, 11 columns of Linear(16,12), BN affine
    expected = 11 * 8 + 11 + 11 * 12 + (2 * 11 if bn else 0)
    assert n_before - surgery.count_parameters(net) == expected
    assert net[0].out_features == 5 and net[3 if bn else 2].in_features == 5
    if bn:
        assert net[1].num_features == 5 and net[1].running_mean.shape == (5,)


def test_single_conv_kept_outputs_unchanged():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    full = conv(x)
    surgery.remove_output_channels(conv, [1, 4, 6])
    assert torch.equal(conv(x), full[:, [1, 4, 6]])
    assert conv.out_channels == 3 and conv.weight.shape == (3, 3, 3, 3)


def test_conv_flatten_linear_repeat():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(6 * 4, 5)).eval()
    (g,) = surgery.channel_groups(net)
    assert g.repeat == 4 and g.consumer == "4"
    _zero_inputs_of_consumer(net, g, [1, 3])
    x = torch.randn(3, 1, 4, 4)
    before = net(x)
    surgery.prune_channels(net, g, [0, 2, 4, 5])
    assert net[4].in_features == 16
    assert torch.allclose(net(x), before, atol=1e-6)


def test_sparse_conv_chain_exact_and_smaller():
    net = sparse_chain()
    x = sparse_input()
    groups = surgery.channel_groups(net)
    assert [(g.producer, g.norms, g.consumer) for g in groups] == [("0", ["1"], "3"), ("3", ["4"], "6")]
    removed = [1, 4]
    _zero_inputs_of_consumer(net, groups[0], removed)
    before = net(x).feats
    n_before = surgery.count_parameters(net)
    surgery.prune_channels(net, "0", [0, 2, 3, 5])
    assert net[0].weight.shape == (27, 3, 4) and net[3].weight.shape == (27, 4, 12) and net[1].num_features == 4
    assert torch.allclose(net(x).feats, before, atol=1e-5)
    assert n_before - surgery.count_parameters(net) == 2 * 27 * 3 + 2 * 27 * 12 + 2 * 2


def test_sparse_single_conv_kept_outputs_unchanged():
    from pointsparse.nn import Conv3d
    torch.manual_seed(1)
    conv = Conv3d(3, 7, 3, bias=True)
    x = sparse_input()
    full = conv(x).feats
    surgery.remove_output_channels(conv, [0, 6])
    assert torch.allclose(conv(x).feats, full[:, [0, 6]], atol=1e-6)
    assert conv.out_channels == 2 and conv.bias.shape == (2,)


def test_apply_ratios_l1_order_and_counts():
    net = mlp(0).eval()
    norms = net[0].weight.abs().sum(1)
    kept = surgery.apply_channel_ratios(net, {"0": 0.25})
    assert kept == {"0": 12}
    assert net[0].weight.shape == (12, 8)
    expected = torch.sort(torch.topk(norms, 12).indices).values
    assert torch.allclose(net[0].weight.abs().sum(1), norms[expected])


@pytest.mark.parametrize("kind", ["linear", "sparse"])
def test_least_squares_reconstruction(kind):
    if kind == "linear":
        net, x = mlp(0, widths=(8, 16, 12, 3)).eval(), torch.randn(200, 8)
        out = lambda m: m(x)  # noqa: E731
        name = "0"
    else:
        net, x = sparse_chain(width=8), sparse_input(n=150)
        out = lambda m: m(x).feats  # noqa: E731
        name = "0"
    ref = out(net)
    plain, fitted = copy.deepcopy(net), copy.deepcopy(net)
    surgery.apply_channel_ratios(plain, {name: 0.5})
    surgery.apply_channel_ratios(fitted, {name: 0.5}, reconstruct=True, calibration_input=x)
    err_plain = (out(plain) - ref).pow(2).mean()
    err_fit = (out(fitted) - ref).pow(2).mean()
    assert err_fit < 0.7 * err_plain


def test_reconstruction_exact_when_nothing_is_lost():
    net = mlp(0, widths=(8, 16, 12, 3)).eval()
    x = torch.randn(100, 8)
    with torch.no_grad():  # channels 8..15 feed nothing: the refit must reproduce the outputs
        net[2].weight[:, 8:] = 0
        net[0].weight[8:] *= 1e-3
    ref = net(x)
    surgery.apply_channel_ratios(net, {"0": 0.5}, reconstruct=True, calibration_input=x)
    assert torch.allclose(net(x), ref, atol=1e-4)


def test_reconstruction_of_a_kernel_region_conv_fits_its_region():
    """The refit of a consumer with a kernel_region solved for all 27
    offsets (its im2col columns had them all) and wrote them all, though the
    conv runs only the region's: with fewer sites than columns the fit
    leaked into the offsets it ignores and missed. The fit is on the
    region's offsets, which reproduce the outputs when nothing is lost; the
    region and the values outside it stay."""
    from pointsparse.nn import Conv3d, ReLU

    torch.manual_seed(0)
    net = nn.Sequential(Conv3d(3, 8, 3, kernel_region="cross"), ReLU(), Conv3d(8, 5, 3, kernel_region="cross")).eval()
    x = sparse_input(n=40)  # 37 sites: fewer than 27 * 4 columns, more than 7 * 4
    with torch.no_grad():  # channels 4..7 feed nothing: the refit must reproduce the outputs
        net[2].weight[:, 4:] = 0
        net[0].weight[:, :, 4:] *= 1e-3
        net[2].weight[0] = 1.0  # outside the region: never run
    ref = net(x).feats
    surgery.apply_channel_ratios(net, {"0": 0.5}, reconstruct=True, calibration_input=x)
    assert net[2].kernel_region == (4, 10, 12, 13, 14, 16, 22) and net[2].weight.shape == (27, 4, 5)
    assert torch.allclose(net(x).feats, ref, atol=1e-4)
    assert bool((net[2].weight[0] == 1.0).all())


def test_reconstruction_leaves_batchnorm_statistics_alone():
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).train()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    surgery.apply_channel_ratios(net, {"0": 0.5}, reconstruct=True, calibration_input=torch.randn(64, 8))
    after = net.state_dict()
    assert int(after["1.num_batches_tracked"]) == int(before["1.num_batches_tracked"])
    assert net.training  # the calibration pass restores the mode


def test_bad_inputs():
    net = mlp(0)
    with pytest.raises(ValueError, match="keep indices"):
        surgery.prune_channels(net, "0", [0, 16])
    with pytest.raises(ValueError, match="repeated"):
        surgery.prune_channels(net, "0", [1, 1])
    with pytest.raises(ValueError, match="at least one"):
        surgery.prune_channels(net, "0", [])
    with pytest.raises(ValueError, match="not a producer"):
        surgery.prune_channels(net, "4", [0])
    with pytest.raises(ValueError, match="not modules of this model"):  # (was torch's AttributeError)
        surgery.prune_channels(net, surgery.ChannelGroup(producer="0", consumer="x"), [0])
    with pytest.raises(ValueError, match="ratio"):
        surgery.apply_channel_ratios(net, {"0": 1.0})
    with pytest.raises(ValueError, match="calibration_input"):
        surgery.apply_channel_ratios(net, {"0": 0.5}, reconstruct=True)
    with pytest.raises(TypeError, match="reconstruct must be True or False"):  # "no" asked for a refit
        surgery.apply_channel_ratios(net, {"0": 0.5}, reconstruct="no")
    with pytest.raises(TypeError, match=r"num_keep must be an int in \[1, 16\]; got 2.5"):  # torch's topk TypeError
        surgery.keep_by_l1(net[0], 2.5)
    with pytest.raises(TypeError):
        surgery.remove_output_channels(nn.ReLU(), [0])



@pytest.mark.parametrize("call, err, match", [
    (lambda net: surgery.apply_channel_ratios(net, {"0": "0.5"}), TypeError, "ratio for '0'"),  # was cut at 0.5
    (lambda net: surgery.apply_channel_ratios(net, {"0": None}), TypeError, "ratio for '0'"),
    (lambda net: surgery.apply_channel_ratios(net, {"0": float("nan")}), ValueError, "ratio for '0'"),
    (lambda net: surgery.apply_channel_ratios(net, [0.5]), TypeError, "ratios must be a dict"),
    (lambda net: surgery.apply_channel_ratios("net", {"0": 0.5}), TypeError, "torch.nn.Module"),
    (lambda net: surgery.channel_groups("net"), TypeError, "torch.nn.Module"),
    (lambda net: surgery.apply_channel_ratios(net, {"0": 0.5}, multiple=4), ValueError, "example_input"),  # ignored
    (lambda net: surgery.prune_channels(net, "0", [0.5, 1.7]), TypeError, "channel indices"),  # was [0, 1]
    (lambda net: surgery.remove_output_channels(net[0], [True, False]), TypeError, "channel indices"),
])
def test_bad_ratios_keeps_and_models_are_named(call, err, match):
    net = mlp(0)
    with pytest.raises(err, match=match):
        call(net)
    assert net[0].out_features == 16 and net[2].in_features == 16  # nothing cut

def test_groups_inside_residual_blocks_only():
    from prune_procedures_support import ResidualNet
    net = ResidualNet().eval()
    groups = surgery.channel_groups(net)
    assert [(g.producer, g.norms, g.consumer) for g in groups] == [
        ("stem.0", ["stem.1"], "stem.3"), ("block.main.0", ["block.main.1"], "block.main.3")]
    x = sparse_input(n=80)
    for g, removed in zip(groups, ([2, 5], [0, 7, 11])):
        _zero_inputs_of_consumer(net, g, removed)
    before = net(x).feats
    surgery.prune_channels(net, groups[0], [c for c in range(8) if c not in (2, 5)])
    surgery.prune_channels(net, groups[1], [c for c in range(12) if c not in (0, 7, 11)])
    assert torch.allclose(net(x).feats, before, atol=1e-5)
    assert net.block.main[3].weight.shape == (27, 9, 8)  # the residual's width is untouched


def test_chain_kinds():
    net = nn.Sequential(nn.Linear(4, 5), nn.Sequential(nn.BatchNorm1d(5), nn.ReLU()), nn.Linear(5, 2))
    (chain,) = surgery.chains(net)
    assert [(n, k) for n, _, k in chain] == [("0", "layer"), ("1.0", "norm"), ("1.1", "pass"), ("2", "layer")]
    assert list(surgery.chain_followers(net)) == ["0", "2"]
    assert surgery.channel_groups(nn.Linear(3, 3)) == []


def test_l1_ranking_of_a_kernel_region_conv_counts_its_region():
    """A channel's L1 norm summed the values outside a conv's kernel_region
    too (loaded there, never run): channels were kept for weights the conv
    ignores. Only the region's offsets count."""
    from pointsparse.nn import Conv3d
    from pointsparse.nn.functional import region_of

    conv = Conv3d(2, 4, 3, kernel_region="cross")
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[region_of(3, "cross")] = torch.tensor([1.0, 2.0, 3.0, 4.0])
        conv.weight[0] = torch.tensor([100.0, 100.0, 0.0, 0.0])  # offset 0 is outside the cross
    assert surgery.channel_l1(conv).tolist() == [14.0, 28.0, 42.0, 56.0]
    assert surgery.keep_by_l1(conv, 2).tolist() == [2, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channel_l1_of_a_half_precision_layer_sums_in_float32(dtype):
    """channel_l1 summed a float16 / bfloat16 weight in its own dtype: 7000
    weights of 10 per channel overflowed float16 (every channel inf, a tie)
    and bfloat16 rounded 70000 and 70070 both to 70144, so keep_by_l1 (the
    ranking of apply_channel_ratios and NetAdapt) kept arbitrary channels.
    The norms are float32 now and rank as the float32 copy's do."""
    layer = nn.Linear(7000, 4, bias=False)
    with torch.no_grad():
        layer.weight.fill_(10.0)
        layer.weight[1] = 10.0625  # (exact in both half types)
        layer.weight[2, :16] = 12.0
    layer = layer.to(dtype)
    reference = layer.weight.detach().float().abs().sum(1)
    l1 = surgery.channel_l1(layer)
    assert l1.dtype == torch.float32 and torch.equal(l1, reference)
    assert surgery.keep_by_l1(layer, 2).tolist() == [1, 2]


def test_channel_l1_of_a_module_without_an_adapter_names_its_layout():
    """channel_l1 read the module's adapter's used_weights before its layout:
    a module no adapter knows failed with "'NoneType' object has no attribute
    'used_weights'" (before, the TypeError naming its channel layout), and
    so did adapters.used_mask. Without an adapter every entry is a weight."""
    from pointsparse.prune import adapters

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))

    with pytest.raises(TypeError, match="cannot tell the channel layout of Custom.weight"):
        surgery.channel_l1(Custom())
    assert torch.equal(adapters.used_mask(Custom()), torch.ones(3, 4, dtype=torch.bool))


def test_channel_removal_narrows_an_attached_filter_skeleton():
    """remove_output_channels / remove_input_channels made a conv's pruning
    permanent; with a filter skeleton attached its hook was left without
    weight_orig (AttributeError at the next forward). The skeleton is
    narrowed with the weight and its mask: the kept channels compute what
    they did."""
    import pointsparse.prune as pprune
    from pointsparse.nn import Conv3d

    torch.manual_seed(0)
    conv = Conv3d(4, 6, 3)
    skeleton = pprune.attach_filter_skeleton(conv, init=0.5)
    with torch.no_grad():
        skeleton.uniform_(0.2, 1.5)
    from reference import random_coords
    import pointsparse as ps

    coords = random_coords(60, 5, seed=2)
    x = ps.SparseTensor(torch.randn(len(coords), 4), coords)
    with torch.no_grad():
        want = conv(x).feats
    surgery.remove_output_channels(conv, [0, 2, 5])
    with torch.no_grad():
        got = conv(x).feats
    torch.testing.assert_close(got, want[:, [0, 2, 5]])
    conv2 = Conv3d(4, 6, 3)
    pprune.attach_filter_skeleton(conv2, init=0.5)
    with torch.no_grad():
        want = conv2(x.with_feats(x.feats * torch.tensor([1.0, 0.0, 1.0, 1.0]))).feats
    surgery.remove_input_channels(conv2, [0, 2, 3])
    with torch.no_grad():
        got = conv2(x.with_feats(x.feats[:, [0, 2, 3]].contiguous())).feats
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("sparse", [False, True])
def test_channel_removal_after_pruning_the_batchnorm_scales(sparse):
    """Network slimming prunes the BatchNorm scales with torch's methods
    (weight_orig + weight_mask on the norm), then removes those channels:
    the norm's weight was sliced but weight_orig and weight_mask kept every
    channel, so the next forward failed in torch ('weight should contain 5
    elements not 8'). The norm's mask is narrowed with it (kept, as the
    layers' are), and the kept outputs are unchanged."""
    net = (sparse_chain(0) if sparse else mlp(0, bn=True)).eval()
    bn = net[1]
    x = sparse_input(40) if sparse else torch.randn(20, 8)
    torch.nn.utils.prune.l1_unstructured(bn, "weight", amount=3)
    keep = torch.nonzero(bn.weight_mask).flatten()
    removed = [c for c in range(len(bn.weight_mask)) if c not in keep.tolist()]
    group = surgery.channel_groups(net)[0]
    with torch.no_grad():
        bn.bias[removed] = 0.0  # (a zero scale and shift: the removed channels feed nothing on)
    ref = net(x)
    surgery.prune_channels(net, group, keep)
    out = net(x)
    out, ref = (out.feats, ref.feats) if sparse else (out, ref)
    assert bn.weight.shape == bn.weight_orig.shape == (len(keep),) and bool(bn.weight_mask.all())
    torch.testing.assert_close(out, ref)


def test_reconstruction_leaves_each_module_in_its_own_mode():
    """capture (the reconstruction's forward) runs the model in eval mode;
    model.train(was) after it put every module in the model's mode (a
    BatchNorm frozen in eval mode while the rest trains was left training)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    net[1].eval()
    surgery.apply_channel_ratios(net, {"0": 0.5}, reconstruct=True, calibration_input=torch.randn(32, 6))
    assert [m.training for m in net] == [True, False, True, True] and net.training


def _masked_mlp():
    """mlp(0, bn=True) with torch's masks on both Linears and on the first norm's scales."""
    net = mlp(0, bn=True).eval()
    torch.nn.utils.prune.l1_unstructured(net[0], "weight", amount=0.3)
    torch.nn.utils.prune.l1_unstructured(net[3], "weight", amount=0.5)
    torch.nn.utils.prune.l1_unstructured(net[1], "weight", amount=2)
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net


def test_channel_cut_keeps_the_layers_masks():
    """The chain path (no example_input) made every cut layer's pruning
    permanent (weight_orig / weight_mask gone): the zeros stayed, but the
    next fine-tuning step regrew them, where DependencyGraph.cut slices the
    masks. The masks stay now, narrowed along the cut axis, and the kept
    outputs are the masked model's."""
    net, x = _masked_mlp(), torch.randn(30, 8)
    keep = torch.tensor([0, 2, 5, 9, 11, 15])
    removed = [c for c in range(16) if c not in keep.tolist()]
    with torch.no_grad():  # the removed channels feed nothing: the cut is exact
        net[3].weight_orig[:, removed] = 0
    masks = {i: getattr(net[i], "weight_mask").clone() for i in (0, 1, 3)}
    ref = net(x)
    surgery.prune_channels(net, surgery.channel_groups(net)[0], keep)
    for i, want in ((0, masks[0][keep]), (1, masks[1][keep]), (3, masks[3][:, keep])):
        assert torch.nn.utils.prune.is_pruned(net[i]) and torch.equal(net[i].weight_mask, want), i
    torch.testing.assert_close(net(x), ref)
    with torch.no_grad():  # a training step on weight_orig: the masked entries stay 0
        net[3].weight_orig.add_(1.0)
    net(x)
    assert torch.equal(net[3].weight == 0, masks[3][:, keep] == 0)


def test_reconstruction_keeps_the_consumers_mask():
    """reconstruct=True refitted the consumer as a dense matrix: its 50%
    unstructured sparsity was gone (sparsity 0.0, no weight_mask). The refit
    is now the least squares over the unmasked weights only (each output's
    own support); the mask stays."""
    torch.manual_seed(1)
    net, x = mlp(0).eval(), torch.randn(200, 8)
    torch.nn.utils.prune.l1_unstructured(net[2], "weight", amount=0.5)
    ref = net(x).detach()
    target = net[2](net[1](net[0](x))).detach()
    surgery.apply_channel_ratios(net, {"0": 0.5}, reconstruct=True, calibration_input=x)
    mask = net[2].weight_mask
    assert mask.shape == (12, 8) and torch.nn.utils.prune.is_pruned(net[2])
    assert bool((net[2].weight[mask == 0] == 0).all())
    assert float((mask == 0).float().mean()) > 0.3
    h = net[1](net[0](x)).detach().double()
    for o in range(12):  # each output row: the least squares over its unmasked inputs
        s = mask[o].bool()
        want = torch.linalg.lstsq(h[:, s], (target[:, o] - net[2].bias[o]).double().unsqueeze(1)).solution
        torch.testing.assert_close(net[2].weight_orig[o, s].double(), want[:, 0], atol=1e-4, rtol=1e-4)
    unfit = mlp(0).eval()  # the refit beats the masked cut without it
    torch.nn.utils.prune.l1_unstructured(unfit[2], "weight", amount=0.5)
    surgery.apply_channel_ratios(unfit, {"0": 0.5})
    assert (net(x) - ref).pow(2).mean() < (unfit(x) - ref).pow(2).mean()


def test_a_layer_called_twice_in_a_chain_is_not_cut():
    """One Linear listed twice in a Sequential (run twice, its output fed back
    into itself): the chain saw it once (named_children skips repeats), so
    cutting '0' or '2' shrank an input that the second call still fed at full
    width: the next forward failed in torch (mat1 and mat2 shapes cannot be
    multiplied). Such groups are fixed, as the dependency graph fixes what it
    cannot cut alone: channel_groups leaves them out and a cut names why."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), lin, nn.ReLU(), lin, nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(5, 8)
    ref = net(x)
    assert surgery.channel_groups(net) == []
    for name in ("0", "2"):
        with pytest.raises(ValueError, match=r"'2' and '4' are one module, called twice"):
            surgery.apply_channel_ratios(net, {name: 0.5})
    with pytest.raises(ValueError, match=r"called twice"):
        surgery.prune_channels(net, "0", [0, 1])
    torch.testing.assert_close(net(x), ref)
    thrice = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), lin, lin, lin, nn.Linear(16, 3), nn.ReLU(), nn.Linear(3, 2))
    assert [g.producer for g in surgery.channel_groups(thrice)] == ["5"]
    with pytest.raises(ValueError, match=r"'3' cannot be cut .*'2', '3' and '4' are one module, called 3 times"):
        surgery.apply_channel_ratios(thrice, {"3": 0.5})


def test_a_layer_whose_weight_another_module_holds_is_not_cut():
    """A weight tied to another module's: the cut gave the layer a new,
    smaller Parameter and left the other module the old one, the tie gone
    silently. Refused now, as the dependency graph refuses it."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(0)
            self.other = nn.Linear(8, 16)
            self.other.weight = self.net[0].weight

        def forward(self, x):
            return self.net(x), self.other(x)

    m = Tied()
    assert [g.producer for g in surgery.channel_groups(m)] == ["net.2"]
    with pytest.raises(ValueError, match=r"'net.0'.*'weight' is shared with other.weight"):
        surgery.apply_channel_ratios(m, {"net.0": 0.5})
    assert m.other.weight is m.net[0].weight and m.net[0].weight.shape == (16, 8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["linear", "sparse"])
def test_reconstruction_refuses_non_finite_calibration(bad, kind):
    """A NaN or inf in calibration_input went into the least squares: the
    consumer's weights came back all NaN, silently. A ValueError now, before
    anything is cut."""
    if kind == "linear":
        net, x = mlp(0).eval(), torch.randn(64, 8)
        x[3, 2] = bad
    else:
        net, x = sparse_chain(width=8), sparse_input(n=150)
        x.feats[3, 1] = bad
    before = {k: v.clone() for k, v in net.state_dict().items()}
    consumer = "2" if kind == "linear" else "3"
    with pytest.raises(ValueError, match=rf"calibration_input gives non-finite values .* of '{consumer}'"):
        surgery.apply_channel_ratios(net, {"0": 0.5}, reconstruct=True, calibration_input=x)
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("mixer", ["softmax", "log_softmax", "channel_shuffle", "group_norm", "layer_norm",
                                   "local_response_norm"])
def test_a_chain_does_not_pass_through_a_module_that_mixes_channels(mixer):
    """A parameter-free module that mixes the channels (a softmax over them,
    a channel shuffle, a norm without affine parameters across them) was
    taken for a channel-wise one: the cut of channels that fed nothing
    changed the kept outputs silently (or the next forward failed in torch,
    the LayerNorm's shape gone). It is a barrier now, as the dependency graph
    fixes those channels: no group crosses it."""
    make = {"softmax": lambda: nn.Softmax(dim=1), "log_softmax": lambda: nn.LogSoftmax(dim=1),
            "channel_shuffle": lambda: nn.ChannelShuffle(2),
            "group_norm": lambda: nn.GroupNorm(2, 16, affine=False),
            "layer_norm": lambda: nn.LayerNorm(16, elementwise_affine=False),
            "local_response_norm": lambda: nn.LocalResponseNorm(3)}[mixer]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), make(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    assert [g.producer for g in surgery.channel_groups(net)] == ["2"]
    with pytest.raises(ValueError, match="'0' is not a prunable producer"):
        surgery.apply_channel_ratios(net, {"0": 0.5})
    assert net[0].weight.shape == (16, 8)


def test_cut_functions_check_their_arguments():
    """remove_input_channels took a float offset / repeat / channels (2.5
    channels kept every input silently: a float arange turned into indices),
    a zero repeat (ZeroDivisionError) and a grouped conv (its inputs cut per
    group, in_channels set to the per-group count: a broken layer), which
    remove_output_channels refuses; prune_channels, channel_l1 and
    keep_by_l1 failed on an attribute for a model, group or module of
    another type. Each is a TypeError / ValueError naming the argument."""
    lin = nn.Linear(16, 4)
    for kwargs, error, match in (({"offset": 1.5}, TypeError, "offset must be an int"),
                                 ({"offset": True}, TypeError, "offset must be an int"),
                                 ({"offset": "a"}, TypeError, "offset must be an int"),
                                 ({"repeat": 1.5}, TypeError, "repeat must be an int"),
                                 ({"repeat": 0}, ValueError, "repeat=0"),
                                 ({"channels": 2.5}, TypeError, "channels must be an int")):
        with pytest.raises(error, match=match):
            surgery.remove_input_channels(lin, [0, 1], **kwargs)
    assert lin.weight.shape == (4, 16)
    surgery.remove_input_channels(lin, [0, 1], offset=torch.tensor(2), channels=np_int(4))
    assert lin.weight.shape == (4, 14) and lin.in_features == 14
    with pytest.raises(ValueError, match="grouped convolutions are not supported"):
        surgery.remove_input_channels(nn.Conv2d(4, 4, 1, groups=2), [0])
    net = mlp(0)
    with pytest.raises(TypeError, match="group must be a ChannelGroup, a CoupledGroup or a producer's name; got int"):
        surgery.prune_channels(net, 0, [0])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got str"):
        surgery.prune_channels("net", "0", [0])
    for fn in (surgery.channel_l1, lambda m: surgery.keep_by_l1(m, 1)):
        with pytest.raises(TypeError, match="ReLU has no tensor named 'weight'"):
            fn(nn.ReLU())


def np_int(v):
    import numpy as np

    return np.int64(v)


def test_a_grouped_conv_in_a_chain_fixes_its_groups_only():
    """A grouped conv in a chain (its weight holds C_in / groups inputs) made
    channel_groups raise for the whole model ('takes 4 inputs, not a multiple
    of the 8 channels'), so no other layer could be cut either. Its groups
    are fixed now, with the adapter's reason, as the dependency graph fixes
    them; the others are cut."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 3, 1)).eval()
    assert [g.producer for g in surgery.channel_groups(net)] == ["4"]
    for name in ("0", "2"):
        with pytest.raises(ValueError, match=rf"'{name}' cannot be cut .*grouped convolution \(groups=2\)"):
            surgery.apply_channel_ratios(net, {name: 0.5})
    assert surgery.apply_channel_ratios(net, {"4": 0.5}) == {"4": 3}
    assert net(torch.randn(2, 3, 5, 5)).shape == (2, 3, 5, 5)


def test_channel_ranking_reads_the_weight_a_masked_layer_computes_with_now():
    """channel_l1 (so keep_by_l1 and apply_channel_ratios without
    example_input) ranked a masked layer by module.weight, the product its
    pre-hook made at the last forward: after an optimizer step on
    weight_orig and before any forward it ranked the old values and kept
    the channels the step had shrunk. It reads weight_orig * mask (times a
    filter skeleton), as the dependency graph's ranking does."""
    net = mlp(0).eval()
    torch.nn.utils.prune.l1_unstructured(net[0], "weight", amount=0.2)
    net(torch.randn(2, 8))
    with torch.no_grad():  # a training step after the last forward: channels 0..7 shrink
        net[0].weight_orig[:8] *= 0.01
    assert surgery.keep_by_l1(net[0], 8).tolist() == list(range(8, 16))
    mask = net[0].weight_mask
    torch.testing.assert_close(surgery.channel_l1(net[0]), (net[0].weight_orig * mask).abs().sum(1).detach())
    surgery.apply_channel_ratios(net, {"0": 0.5})
    torch.testing.assert_close(net[0].weight_mask, mask[8:])


def test_reconstruction_of_a_fused_consumer_is_refused_before_any_cut():
    """nn.fuse_for_inference runs a conv's ReLU (and a residual block's sum,
    ``add=``) in its store: the consumer's output is relu(x @ W + b [+ add]),
    which the least squares took for the linear x @ W + b. The refit of such
    a consumer moved the output further from the uncut model's than no refit
    (on a fused sparse chain, and 0.04 -> 0.24 on a fused MinkUNet's last
    block). It is refused, naming the consumer, before any cut."""
    from pointsparse.nn import fuse_for_inference

    fused = fuse_for_inference(sparse_chain())
    assert fused[3].relu
    x = sparse_input(n=200)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with pytest.raises(ValueError, match=r"'3' runs its ReLU .* in its store .*fuse_for_inference.* before fusing"):
        surgery.apply_channel_ratios(fused, {"0": 0.5}, reconstruct=True, calibration_input=x)
    assert fused[0].weight.shape[2] == 6 and all(torch.equal(fused.state_dict()[k], v) for k, v in before.items())
    surgery.apply_channel_ratios(fused, {"0": 0.5})  # (the cut alone is as before)
    assert fused[3].weight.shape[1] == 3


def test_reconstruction_of_an_unsupported_consumer_is_refused_before_any_cut():
    """reconstruct=True with a consumer that has no least-squares columns
    (a ConvTranspose2d, a torch Conv3d) cut the producer and its consumer
    first and then raised the TypeError: the model was left cut and not
    refitted, though the call had failed. The check comes before any cut."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                        nn.ConvTranspose2d(8, 3, 3)).eval()
    x = torch.randn(2, 3, 5, 5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TypeError, match="least-squares reconstruction does not support ConvTranspose2d"):
        surgery.apply_channel_ratios(net, {"0": 0.5, "2": 0.5}, reconstruct=True, calibration_input=x)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_a_chain_does_not_pass_through_a_module_with_buffers():
    """A parameter-free module whose tensors are buffers (a compressed
    formats.SparseLinear: weight and bias held as buffers) was taken for an
    activation: the chain grouped the Linear before it with the Linear after
    it, and the cut left a model whose next forward was refused ('input must
    be (..., 16); got (5, 8)'). A module with buffers is a barrier now, as
    the dependency graph does not cut across it."""
    from pointsparse import formats

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), formats.compress(nn.Linear(16, 16), "csr"), nn.ReLU(),
                        nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    x = torch.randn(5, 8)
    ref = net(x)
    assert [(g.producer, g.consumer) for g in surgery.channel_groups(net)] == [("4", "6")]
    with pytest.raises(ValueError, match="'0' is not a prunable producer"):
        surgery.apply_channel_ratios(net, {"0": 0.5})
    torch.testing.assert_close(net(x), ref)


def test_a_chain_does_not_pass_through_an_unflatten():
    """nn.Unflatten holds the sizes it splits into (the channel count among
    them): the chain passed through it, and after the cut of '2' the next
    forward failed in torch ('unflatten: Provided sizes [8, 1, 1] don't
    multiply up to the size of dim 1 (4)'). It is a barrier now."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Unflatten(1, (8, 1, 1)),
                        nn.Conv2d(8, 3, 1)).eval()
    assert [(g.producer, g.consumer) for g in surgery.channel_groups(net)] == [("0", "2")]
    with pytest.raises(ValueError, match="'2' is not a prunable producer"):
        surgery.apply_channel_ratios(net, {"2": 0.5})
    surgery.apply_channel_ratios(net, {"0": 0.5})
    assert net(torch.randn(5, 8)).shape == (5, 3, 1, 1)


@pytest.mark.parametrize("group, match", [
    (surgery.ChannelGroup("0", ["1"], "2"), r"consumer '2' is a ReLU"),
    (surgery.ChannelGroup("0", ["2"], "3"), r"norm '2' is a ReLU"),
    (surgery.ChannelGroup("0", ["3"]), r"norm '3' is a Conv2d"),
    (surgery.ChannelGroup("0", ["1"], "3", offset=4), r"consumer '3'.*offset=4"),
    (surgery.ChannelGroup("0", ["1"], "3", repeat=2), r"consumer '3'.*repeat=2"),
    (surgery.ChannelGroup("0", ["1"], "0"), r"consumer '0'.*3 inputs"),
    (surgery.ChannelGroup("0", ["1"], "3", offset="a"), r"offset must be an int"),
    (surgery.ChannelGroup("0", ["1", "1"], "3"), r"norm '1' twice"),
    (surgery.ChannelGroup("0", "1", "3"), r"norms must be a list of module names"),
    (surgery.ChannelGroup("0", ["4"], "3"), r"norm '4' has 6 channels.*'0' has 8"),
    (surgery.ChannelGroup("2", [], "3"), r"producer '2' is a ReLU"),
])
def test_a_hand_made_group_is_checked_whole_before_any_cut(group, match):
    """prune_channels of a hand-made ChannelGroup whose consumer or norm is
    no layer / norm of the model (a ReLU), or whose span does not fit the
    consumer's inputs, cut the producer (and its norms) and then raised: a
    half-cut model that no longer ran. Every member is checked first; a
    ValueError names the member, and nothing is cut."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(6))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        surgery.prune_channels(net, group, [0, 1, 6, 7])
    after = net.state_dict()
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items())
    assert net[0].out_channels == 8 and net[1].num_features == 8 and net[3].in_channels == 8


def test_a_hand_made_group_with_a_tied_member_is_not_cut():
    """A hand-made ChannelGroup outside any chain whose consumer shares its
    weight with another layer (c.weight = b.weight) was cut: b got a new,
    narrower weight and c kept the old one, the tie silently gone. Its
    channels are fixed, as the chain groups and the dependency graph fix
    them: a ValueError naming the tie, nothing cut."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.c.weight = self.b.weight

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    net = Tied()
    with pytest.raises(ValueError, match=r"'b' cannot be cut.*shared with c\.weight"):
        surgery.prune_channels(net, surgery.ChannelGroup("a", [], "b"), [0, 1, 2, 3])
    assert net.b.weight is net.c.weight and net.a.out_features == 8 and net.b.weight.shape == (8, 8)


def test_prune_channels_cuts_the_coupled_groups_channel_groups_gives():
    """channel_groups(model, example_input) gives the dependency graph's
    CoupledGroups, which prune_channels refused (a TypeError: "group must be
    a ChannelGroup or a producer's name"), so the pipeline its docstring
    leads to stopped there. prune_channels cuts such a group as the graph
    does, every member at once: the cut model computes what the masked one
    does; a group left unchanged by an earlier cut is still taken, one
    changed by it, of another model or made by hand is a ValueError."""
    from pointsparse.prune import graph as G
    from prune_procedures_support import ResidualNet

    net, x = ResidualNet().eval(), sparse_input(n=200, channels=3)
    masked = copy.deepcopy(net)
    groups = surgery.channel_groups(net, x)
    assert all(isinstance(g, G.CoupledGroup) for g in groups) and len(groups) >= 2
    keeps = {g.name: torch.arange(0, g.size, 2) for g in groups}
    reference = G.DependencyGraph(masked, x)
    reference.mask({g.name: keeps[g.name] for g in reference.groups})
    with torch.no_grad():
        want = masked(x).feats
    n_before = surgery.count_parameters(net)
    for g in groups:  # (each cut retraces the graph: the groups it left unchanged are still those of the model)
        surgery.prune_channels(net, g, keeps[g.name])
    assert surgery.count_parameters(net) < 0.6 * n_before
    with torch.no_grad():
        torch.testing.assert_close(net(x).feats, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="changed since"):
        surgery.prune_channels(net, groups[0], [0])
    other = ResidualNet()
    with pytest.raises(ValueError, match="another model"):
        surgery.prune_channels(other, surgery.channel_groups(net, x)[0], [0])
    with pytest.raises(ValueError, match="no dependency graph"):
        surgery.prune_channels(other, G.CoupledGroup("stem.0", 8), [0])
    assert surgery.count_parameters(other) == n_before


def test_a_linear_flattened_with_other_axes_is_not_cut_by_its_chain():
    """A Linear on (B, T, C) carries its channels on the last axis; a Flatten
    after it makes input t * C + c of the next layer of channel c, the
    channels interleaved with the T axis. The chain took the consumer's
    T * C inputs for a Conv's flatten, each channel a run of T inputs, and
    cut runs that held other channels: the cut model computed another
    output, without a word. Such a group is fixed in a chain (the
    dependency graph, traced on an input, fixes it too)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8, 6), nn.ReLU(),
                        nn.Linear(6, 4)).eval()
    assert [g.producer for g in surgery.channel_groups(net)] == ["3"]
    with pytest.raises(ValueError, match=r"'0' cannot be cut .*last axis.*example_input"):
        surgery.apply_channel_ratios(net, {"0": 0.5})
    with pytest.raises(ValueError, match=r"'0' cannot be cut .*last axis"):
        surgery.prune_channels(net, "0", [0, 2, 4, 6])
    assert net[0].out_features == 8 and net[3].in_features == 24
    x = torch.randn(7, 3, 5)
    before = net(x)
    surgery.apply_channel_ratios(net, {"3": 0.5})  # (the Linear after the Flatten: its channels are on axis 1)
    assert net[3].out_features == 3 and net(x).shape == before.shape


@pytest.mark.parametrize("channels,ratio", [(5, 0.5), (9, 0.5), (10, 0.25), (7, 0.5)])
def test_a_chain_and_its_coupled_group_keep_the_same_count_at_a_tie(channels, ratio):
    """apply_channel_ratios keeps as many channels through a chain as
    through the coupled group of the same producer (example_input), and
    AMC's FLOPs count (flops_for, on either kind of layer list) the width
    the cut gives. The dependency graph's kept_count rounds a tie up (0.5
    of 5 channels keeps 3), while the chains' rounded it half to even (2):
    the same call kept 2 channels without example_input and 3 with it, and
    a coupled AMC search counted the FLOPs of 2."""
    from pointsparse.prune import amc

    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(4, channels), nn.ReLU(), nn.Linear(channels, 2)) for _ in range(3)]
    example = torch.randn(3, 4)
    chain = surgery.apply_channel_ratios(nets[0], {"0": ratio})
    coupled = surgery.apply_channel_ratios(nets[1], {"0": ratio}, example_input=example)
    assert chain == coupled == {"0": surgery.kept_count(channels, ratio)}
    for is_coupled in (False, True):
        infos = amc.layer_infos(nets[2], example, coupled=is_coupled)
        dense = amc.flops_for(infos, {})
        cut = amc.layer_infos(nets[0], example, coupled=is_coupled)
        assert amc.flops_for(infos, {"0": ratio}) == pytest.approx(amc.flops_for(cut, {})), is_coupled
        assert amc.flops_for(cut, {}) < dense



class _Halved(nn.Module):
    """A parametrization without right_inverse: no value can be assigned to its tensor."""

    def forward(self, w):
        return w * 0.5


# (the parametrized module of sparse_chain, the groups it fixes, and a group left to cut)
_PARAMETRIZED = {"3": (["0", "3"], None), "4": (["3"], "0"), "6": (["3"], "0"), "0": (["0"], "3")}


@pytest.mark.parametrize("kind,where", [(kind, where) for kind in ("spectral_norm", "no right_inverse")
                                        for where in sorted(_PARAMETRIZED)  # a producer and/or consumer, a norm
                                        if (kind, where) != ("spectral_norm", "4")])  # (none on a 1-d tensor)
@pytest.mark.parametrize("entry", ["chain", "graph"])
def test_a_parametrization_a_cut_cannot_follow_fixes_its_groups(where, kind, entry):
    """A layer or norm whose tensor is under a torch parametrization that
    cannot take the sliced value (spectral_norm, whose power-iteration
    vectors keep the old width; one without right_inverse) failed inside
    the cut with torch's error ("size mismatch ... vec (64)",
    "parametrization _Halved does not implement right_inverse"), after the
    members before it had been cut: the model was left half cut and every
    forward failed. Its groups are fixed now, naming the parametrization
    and how to remove it: a cut of them is a ValueError before anything
    changes, a plan leaves them, and the other groups are cut."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import spectral_norm

    from pointsparse.prune import graph

    net, x = sparse_chain(), sparse_input(n=200)
    if kind == "spectral_norm":
        spectral_norm(net[int(where)], "weight")
    else:
        parametrize.register_parametrization(net[int(where)], "weight", _Halved())
    net.eval()
    with torch.no_grad():
        expect = net(x).feats
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fixed, free = _PARAMETRIZED[where]
    why = rf"{where}: its 'weight' is parametrized by .*remove_parametrizations\(module, 'weight'\)"
    for group in fixed:
        with pytest.raises(ValueError, match=rf"'?{group}'? cannot be cut .*{why}"):
            if entry == "chain":
                surgery.apply_channel_ratios(net, {group: 0.5})
            else:
                surgery.prune_channels(net, next(g for g in surgery.channel_groups(net, x) + graph.DependencyGraph(
                    net, x).fixed_groups if g.name == group), [0, 1])
        assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
        with torch.no_grad():
            assert torch.equal(net(x).feats, expect)
    if entry == "graph":
        kept = graph.prune_model(net, x, 0.5)
        assert not set(fixed) & set(kept)
    elif free is not None:
        surgery.apply_channel_ratios(net, {free: 0.5})
    norm = {"0": "1.bias", "3": "4.bias"}  # (each group's BatchNorm: its width)
    assert all(net.state_dict()[norm[g]].shape == before[norm[g]].shape for g in fixed)
    if free is not None:
        assert net.state_dict()[norm[free]].shape[0] < before[norm[free]].shape[0]
    with torch.no_grad():
        assert net(x).feats.shape == expect.shape


def test_weight_norm_is_cut_with_its_layer():
    """weight_norm's right_inverse recomputes its tensors from the sliced
    weight: its layer is cut as a plain one, the outputs the same."""
    from torch.nn.utils.parametrizations import weight_norm

    from pointsparse.prune import graph

    x = sparse_input(n=200)
    for entry in ("chain", "graph"):
        normed, plain = sparse_chain(), sparse_chain()
        weight_norm(normed[3], "weight", dim=2)
        if entry == "chain":
            surgery.apply_channel_ratios(normed, {"0": 0.5, "3": 0.5})
            surgery.apply_channel_ratios(plain, {"0": 0.5, "3": 0.5})
        else:
            assert graph.prune_model(normed, x, 0.5) == graph.prune_model(plain, x, 0.5)
        assert normed[3].weight.shape == plain[3].weight.shape and normed[3].weight.shape[1] == 3
        with torch.no_grad():
            torch.testing.assert_close(normed(x).feats, plain(x).feats)
