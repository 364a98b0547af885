"""MinkUNet and its blocks: shapes, gradients, a dense reference for the
residual block, translation equivariance, batch independence, SyncBatchNorm."""

from __future__ import annotations

import copy
import math

import re

import pytest
import torch
import torch.nn.functional as F

import pointsparse as ps
from pointsparse.models import MinkUNet, ResidualBlock, SyncBatchNorm
from pointsparse import nn as spnn

pytestmark = pytest.mark.usefixtures("one_thread")


def _cloud(n=300, channels=4, seed=0, extent=12, batch=1):
    g = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.cat([torch.randint(0, batch, (n, 1), generator=g),
                                     torch.randint(0, extent, (n, 3), generator=g)], 1), dim=0).int()
    feats = torch.randn(len(coords), channels, generator=g)
    return ps.SparseTensor(feats, coords)




def test_minkunet_shapes_and_backward():
    torch.manual_seed(0)
    x = _cloud(400, 7, extent=40)
    net = MinkUNet(7, 5, cr=0.25)
    assert net.widths == (8, 8, 16, 32, 64, 64, 32, 24, 24)
    out = net(x)
    assert out.feats.shape == (len(x), 5) and torch.equal(out.coords, x.coords) and out.stride == (1, 1, 1)
    out.feats.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())
    default = MinkUNet(4, 19)
    assert default.widths == (32, 32, 64, 128, 256, 256, 128, 96, 96)


def test_minkunet_single_point_and_bad_inputs():
    net = MinkUNet(3, 2, cr=0.125).eval()
    one = ps.SparseTensor(torch.randn(1, 3), torch.zeros(1, 4, dtype=torch.int32))
    assert net(one).feats.shape == (1, 2)
    with pytest.raises(ValueError, match="3 input channels"):
        net(ps.SparseTensor(torch.randn(1, 4), torch.zeros(1, 4, dtype=torch.int32)))
    with pytest.raises(TypeError, match="SparseTensor"):
        net(torch.randn(3, 3))
    with pytest.raises(ValueError, match="stride-1"):
        net(ps.SparseTensor(torch.randn(1, 3), torch.zeros(1, 4, dtype=torch.int32), stride=2))
    for kwargs, error in (({"in_channels": 0, "num_classes": 2}, ValueError),
                          ({"in_channels": 3, "num_classes": 2, "cr": 0}, ValueError),
                          ({"in_channels": 3, "num_classes": 2.5}, TypeError),
                          ({"in_channels": 3, "num_classes": 2, "blocks": 0}, ValueError)):
        with pytest.raises(error):
            MinkUNet(**kwargs)


@pytest.mark.parametrize("cr", [True, "1", None, float("nan"), -1.0, 1e307])
def test_minkunet_cr_refused_naming_the_value_passed(cr):
    from pointsparse.models import SPVCNN

    for cls in (MinkUNet, SPVCNN):
        with pytest.raises(ValueError, match=r"cr" if cr == 1e307 else rf"cr must be a positive number; got {cr!r}"):
            cls(4, 5, cr=cr)


def test_minkunet_and_spvcnn_refuse_too_many_parameters_before_building(monkeypatch):
    from pointsparse.models import SPVCNN, minkunet

    # The count is exact: a model just at the limit builds, one value more is refused.
    small = {cls: sum(p.numel() for p in cls(3, 2, cr=0.125, blocks=1).parameters()) for cls in (MinkUNet, SPVCNN)}
    for cls, total in small.items():
        monkeypatch.setattr(minkunet, "MAX_PARAMETERS", total)
        cls(3, 2, cr=0.125, blocks=1)
        monkeypatch.setattr(minkunet, "MAX_PARAMETERS", total - 1)
        built = []
        monkeypatch.setattr(spnn.Conv3d, "reset_parameters", lambda self: built.append(self))
        with pytest.raises(ValueError, match=rf"{cls.__name__}\(in_channels=3, num_classes=2, cr=0.125, blocks=1\) "
                                             rf"would have {total:,} parameter values"):
            cls(3, 2, cr=0.125, blocks=1)
        assert not built  # refused before the first layer
        monkeypatch.undo()


def test_minkunet_translation_equivariant_by_total_stride():
    torch.manual_seed(1)
    net = MinkUNet(4, 3, cr=0.125).eval()
    x = _cloud(300, 4, extent=20)
    shifted = x.coords.clone()
    shifted[:, 1:] += torch.tensor([16, -32, 48], dtype=torch.int32)
    y1 = net(x).feats
    y2 = net(ps.SparseTensor(x.feats, shifted)).feats
    assert torch.allclose(y1, y2, atol=1e-5)


@pytest.mark.parametrize("name", ["MinkUNet", "SPVCNN"])
def test_decoder_stage_input_dies_after_the_stage_s_first_block(name):
    """In inference the joined (cat) input of a decoder stage, the stage's
    widest tensor, is freed once its first block has run: the model's
    forward held it through the whole stage (about a fifth of MinkUNet's
    peak memory on 8 KITTI sweeps). The outputs stay the model's, and a
    stage with a hook of its own is still called whole (its hook runs)."""
    import weakref

    from pointsparse.models import SPVCNN

    torch.manual_seed(3)
    net = (MinkUNet if name == "MinkUNet" else SPVCNN)(4, 3, cr=0.25).eval()
    x = _cloud(400, 4, seed=4, extent=20)
    args = (x,) if name == "MinkUNet" else (x, torch.arange(len(x)), x.coords[:, 1:].float() + 0.5,
                                            torch.zeros(len(x), dtype=torch.int64))
    first_inputs, dead = [], []
    for stage in net.fuse if name == "MinkUNet" else net.unet.fuse:
        stage[0].register_forward_pre_hook(lambda m, a: first_inputs.append(weakref.ref(a[0].feats)))
        stage[1].register_forward_pre_hook(lambda m, a: dead.append(first_inputs[-1]() is None))
    with torch.no_grad():
        out = net(*args)
    assert dead == [True] * 4
    whole = []
    (net.fuse if name == "MinkUNet" else net.unet.fuse)[2].register_forward_hook(lambda *a: whole.append(1))
    with torch.no_grad():
        again = net(*args)
    assert whole == [1] and dead[4:] == [True, True, False, True]
    assert torch.equal(getattr(out, "feats", out), getattr(again, "feats", again))


def test_minkunet_batch_items_independent_in_eval():
    torch.manual_seed(2)
    net = MinkUNet(4, 3, cr=0.125).eval()
    a, b = _cloud(200, 4, seed=1), _cloud(150, 4, seed=2)
    both = ps.collate([a, b])
    out = net(both).feats
    assert torch.allclose(out[: len(a)], net(a).feats, atol=1e-5)
    assert torch.allclose(out[len(a):], net(b).feats, atol=1e-5)


def _dense_submanifold(dense, weight, mask, k):
    """Dense reference of a stride-1 sparse conv: cross-correlation with zero
    padding, read at the active sites (inactive sites zeroed)."""
    kv, cin, cout = weight.shape
    w = weight.reshape(k, k, k, cin, cout).permute(4, 3, 0, 1, 2)
    return F.conv3d(dense, w, padding=(k - 1) // 2) * mask


def test_residual_block_matches_dense_reference():
    torch.manual_seed(3)
    x = _cloud(120, 3, extent=6).double()
    block = ResidualBlock(3, 5).double().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics and affine terms
        for m in block.modules():
            if isinstance(m, spnn.BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    out = block(x).dense((6, 6, 6))
    dense = x.dense((6, 6, 6))
    mask = x.with_feats(torch.ones(len(x), 1, dtype=torch.float64)).dense((6, 6, 6))

    def bn(t, m):
        shape = (1, -1, 1, 1, 1)
        return ((t - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
                * m.weight.view(shape) + m.bias.view(shape)) * mask

    conv1, bn1, _, conv2, bn2 = block.main
    h = torch.relu(bn(_dense_submanifold(dense, conv1.weight, mask, 3), bn1))
    h = bn(_dense_submanifold(h, conv2.weight, mask, 3), bn2)
    sc_conv, sc_bn = block.shortcut
    s = bn(_dense_submanifold(dense, sc_conv.weight, mask, 1), sc_bn)
    ref = torch.relu(h + s) * mask
    assert torch.allclose(out, ref, atol=1e-10)


def test_residual_block_gradcheck():
    torch.manual_seed(4)
    x = _cloud(20, 2, extent=3).double()
    block = ResidualBlock(2, 2).double()
    feats = x.feats.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: block(x.with_feats(f)).feats, (feats,), atol=1e-6)


def test_sync_batchnorm_without_a_process_group_is_batchnorm():
    torch.manual_seed(5)
    net = torch.nn.Sequential(spnn.Conv3d(3, 4, 3), spnn.BatchNorm(4), spnn.ReLU())
    x = _cloud(100, 3)
    ref = net(x).feats
    synced = SyncBatchNorm.convert(net)
    assert isinstance(synced[1], SyncBatchNorm)
    assert torch.allclose(synced(x).feats, ref)



@pytest.mark.parametrize("bad", [3, None, "bn", [torch.nn.BatchNorm1d(4)]])
def test_sync_batchnorm_convert_refuses_what_is_no_module(bad):
    """convert() of something that is no module (a list of layers, None)
    was an AttributeError ('int' object has no attribute 'named_children')
    from its walk; a TypeError naming the argument, as
    torch.nn.SyncBatchNorm.convert_sync_batchnorm is given modules only."""
    with pytest.raises(TypeError, match=rf"module must be a torch.nn.Module; got {type(bad).__name__}"):
        SyncBatchNorm.convert(bad)

def test_sync_batchnorm_convert_keeps_dtype_and_frozen_parameters():
    """convert() gives each BatchNorm's replacement its dtype (and device)
    and its parameters' requires_grad: a float64 network stayed float32
    there (its next forward a TypeError), a frozen BatchNorm trained."""
    torch.manual_seed(5)
    net = torch.nn.Sequential(spnn.Conv3d(3, 4, 3), spnn.BatchNorm(4), spnn.ReLU(),
                              torch.nn.Sequential(spnn.Linear(4, 4), spnn.BatchNorm(4))).double()
    for p in net[3][1].parameters():
        p.requires_grad_(False)
    x = _cloud(100, 3).double()
    ref = net(x).feats
    synced = SyncBatchNorm.convert(net)
    assert isinstance(synced[1], SyncBatchNorm) and isinstance(synced[3][1], SyncBatchNorm)
    assert all(t.dtype == torch.float64 for t in (*synced.parameters(), synced[1].running_var))
    assert not any(p.requires_grad for p in synced[3][1].parameters()) and synced[1].weight.requires_grad
    assert torch.equal(synced(x).feats, ref)


def test_sync_batchnorm_convert_keeps_pruning_masks():
    """A BatchNorm masked by pruning (DependencyGraph.mask: weight_orig,
    weight_mask and the hook on the norms too) converts with its masks: its
    state_dict did not load into a fresh SyncBatchNorm (RuntimeError, so
    `train --nproc 2` of a channel-masked model failed)."""
    from pointsparse import prune
    from pointsparse.prune import graph

    torch.manual_seed(9)
    net = MinkUNet(4, 3, cr=0.25, blocks=1).eval()
    x = _cloud(1500, 4, extent=20)
    g = graph.DependencyGraph(net, x)
    g.mask(graph.plan(g, 0.5))
    keys, ref = list(net.state_dict()), net(x).feats
    assert "stem.0.1.weight_mask" in keys
    synced = SyncBatchNorm.convert(net)
    assert isinstance(synced.stem[0][1], SyncBatchNorm) and list(synced.state_dict()) == keys
    assert torch.equal(synced(x).feats, ref)
    prune.remove(synced.stem[0][1], "weight")
    assert "weight" in dict(synced.stem[0][1].named_parameters()) and torch.equal(synced(x).feats, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sync_batchnorm_statistics_of_16_bit_feats_in_float32(monkeypatch, dtype):
    """In a distributed job (simulated: two processes, an all-reduce that
    finds one shard, the whole batch) 16-bit feats are normalised as
    BatchNorm normalises them, statistics in float32 and output in their
    dtype: a float16 shard's sum overflowed (NaN outputs, inf running
    statistics), bfloat16 ones were off by 0.03 and came back float32."""
    from pointsparse.models import sync_batchnorm

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args: 2)
    monkeypatch.setattr(sync_batchnorm, "_all_reduce", lambda tensor: tensor)
    x = _cloud(6000, 4, extent=30)
    x = x.with_feats((x.feats * 3 + 40).to(dtype))
    synced, plain = SyncBatchNorm(4).train(), spnn.BatchNorm(4).train()
    out, ref = synced(x).feats, plain(x).feats
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(synced.running_mean, plain.running_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(synced.running_var, plain.running_var, rtol=1e-4, atol=1e-4)


def test_sync_batchnorm_checks_its_input_in_a_distributed_job(monkeypatch):
    """In a distributed job (simulated as above) the input's channels are
    checked as BatchNorm checks them: one channel into SyncBatchNorm(4) was
    broadcast to 4 output channels (and into the running statistics),
    others were torch's broadcast error."""
    from pointsparse.models import sync_batchnorm

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args: 2)
    monkeypatch.setattr(sync_batchnorm, "_all_reduce", lambda tensor: tensor)
    synced = SyncBatchNorm(4).train()
    x = _cloud(200, 1)
    with pytest.raises(ValueError, match="feats have 1 channels but num_features is 4"):
        synced(x)
    with pytest.raises(TypeError, match="feats are torch.float64"):
        synced(_cloud(200, 4).double())
    for bad in (x.feats, torch.zeros(20, 4, 3)):
        with pytest.raises(ValueError, match=r"SparseTensor or an \(N, 4\) tensor"):
            synced(bad)
    assert synced.num_batches_tracked == 0 and not synced.running_mean.any()
    feats = _cloud(200, 4).feats
    assert synced(feats).shape == feats.shape


def test_sync_batchnorm_refuses_one_site_over_all_processes(monkeypatch):
    """In a distributed job (simulated as above) a batch whose processes hold
    one site between them is the BatchStatisticsError that BatchNorm gives one
    process (which `pointsparse train` turns into advice on --voxel-size and
    --batch-size): SyncBatchNorm normalised it to zeros without a word and
    took 0 into its running variance."""
    from pointsparse.models import sync_batchnorm

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args: 2)
    monkeypatch.setattr(sync_batchnorm, "_all_reduce", lambda tensor: tensor)
    one = _cloud(1, 4)
    assert one.feats.shape[0] == 1
    with pytest.raises(spnn.BatchStatisticsError) as plain:
        spnn.BatchNorm(4).train()(one)
    synced = SyncBatchNorm(4).train()
    with pytest.raises(spnn.BatchStatisticsError) as error:
        synced(one)
    assert str(error.value) == str(plain.value).replace("(1, 1, 1)", "(1, 1, 1) over all processes")
    with pytest.raises(spnn.BatchStatisticsError, match=r"BatchNorm\(4\) .* got 1 row over all processes"):
        synced(one.feats)
    assert synced.num_batches_tracked == 0 and torch.equal(synced.running_var, torch.ones(4))
    two = _cloud(2, 4)
    assert two.feats.shape[0] == 2 and synced(two).feats.abs().sum() > 0  # two sites: normalised


def test_spvcnn_per_point_logits_and_backward():
    from pointsparse.models import SPVCNN

    torch.manual_seed(6)
    g = torch.Generator().manual_seed(0)
    points = torch.rand(600, 3, generator=g) * 12
    batch = (torch.arange(600) >= 350).long()
    x, inverse = ps.voxelize(points, torch.randn(600, 4, generator=g), voxel_size=1.0, batch=batch)
    net = SPVCNN(4, 5, cr=0.125, blocks=1)
    out = net(x, inverse, points, batch)
    assert out.shape == (600, 5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert net.point_mlps[0][0].weight.grad.abs().sum() > 0
    # Two points in one voxel can be told apart (the point branch sees positions).
    net.eval()
    pts = torch.tensor([[0.1, 0.5, 0.5], [0.9, 0.5, 0.5], [1.5, 0.5, 0.5]])
    v, inv = ps.voxelize(pts, torch.randn(3, 4), voxel_size=1.0)
    y = net(v, inv, pts, torch.zeros(3, dtype=torch.long))
    assert inv[0] == inv[1] and not torch.allclose(y[0], y[1])
    with pytest.raises(ValueError, match="points must be"):
        net(v, inv, pts[:2], torch.zeros(3, dtype=torch.long))


def test_spvcnn_searches_the_stride_1_corners_once_a_forward(monkeypatch):
    """The stem's output and the last decoder stage's are on the same
    stride-1 coords: their trilinear corners were searched twice each
    forward (4 searches for 3 strides). Once now, the logits as before, with
    the gradient and in inference mode (whose tensors keep no version
    counter)."""
    import importlib

    from pointsparse.models import SPVCNN

    vox = importlib.import_module("pointsparse.voxelize")  # (the package's name voxelize is the function)
    g = torch.Generator().manual_seed(1)
    points = torch.rand(500, 3, generator=g) * 10
    batch = (torch.arange(500) >= 300).long()
    x, inverse = ps.voxelize(points, torch.randn(500, 4, generator=g), voxel_size=1.0, batch=batch)
    torch.manual_seed(2)
    net = SPVCNN(4, 3, cr=0.125, blocks=1)
    searched, search = [], vox._trilinear
    monkeypatch.setattr(vox, "_trilinear", lambda t, *a: searched.append(t.stride) or search(t, *a))
    feats = x.feats.clone().requires_grad_()
    torch.manual_seed(3)  # (its dropout's draw)
    out = net(x.with_feats(feats), inverse, points, batch)
    assert sorted(searched) == [(1, 1, 1), (4, 4, 4), (16, 16, 16)], searched
    out.square().sum().backward()
    searched.clear()
    with torch.inference_mode():
        inferred = net.eval()(x, inverse, points, batch)
    assert sorted(searched) == [(1, 1, 1), (4, 4, 4), (16, 16, 16)], searched
    # each read made on its own (the memo given none) gives the same logits and gradient
    monkeypatch.setattr(vox, "_trilinear_kept", lambda t, p, vs, b, corners, given: vox._trilinear(t, p, vs, b))
    with torch.inference_mode():
        assert torch.equal(net(x, inverse, points, batch), inferred)
    searched.clear()
    feats2 = x.feats.clone().requires_grad_()
    torch.manual_seed(3)
    out2 = net.train()(x.with_feats(feats2), inverse, points, batch)
    out2.square().sum().backward()
    assert len(searched) == 4 and torch.equal(out, out2) and torch.equal(feats.grad, feats2.grad)
    # the memo itself: the same coords, points and batch objects reuse an entry; others do not
    monkeypatch.undo()
    corners, read = [], []
    monkeypatch.setattr(vox, "_trilinear", lambda t, *a: read.append(1) or search(t, *a))
    first = vox._devoxelize(x, None, points, 1.0, batch, "trilinear", corners)
    assert torch.equal(vox._devoxelize(x.with_feats(x.feats * 2), None, points, 1.0, batch, "trilinear", corners),
                       first * 2) and len(read) == 1
    vox._devoxelize(x, None, points.clone(), 1.0, batch, "trilinear", corners)  # other points: searched
    vox._devoxelize(x, None, points, 2.0, batch, "trilinear", corners)  # another voxel size: searched
    vox._devoxelize(ps.SparseTensor(x.feats, x.coords.clone()), None, points, 1.0, batch, "trilinear", corners)
    assert len(read) == 4  # (equal coords, another object: searched)


@pytest.mark.parametrize("where", ["unet.stem", "unet.fuse.1"])
def test_spvcnn_names_a_voxel_prune_that_dropped_the_voxels_of_its_points(where):
    """SPVCNN averages every point into the voxels after its bottleneck and
    its second decoder stage: a VoxelPrune before those that drops every
    voxel around a point (here isolated points, one voxel each at every
    stride) leaves the point no voxel. The ValueError says so and where to
    prune instead; it said 'points and voxels from different inputs?',
    which they are not. After the last of those steps the model runs, and
    so it does between them at strides 16 and 8 (the decoder comes back to
    every stride-4 voxel before the second average), which the message
    left out of the places it named."""
    from pointsparse.models import SPVCNN, add_voxel_prune

    points = torch.tensor([[40.0 * i + 0.5, 0.5, 0.5] for i in range(8)])
    x, inverse = ps.voxelize(points, torch.randn(8, 4), voxel_size=1.0)
    batch = torch.zeros(8, dtype=torch.long)
    net = SPVCNN(4, 3, cr=0.125, blocks=1).eval()
    add_voxel_prune(net, where, 0.5)
    with pytest.raises(ValueError, match=r"VoxelPrune.* dropped .*unet\.up\.0, unet\.fuse\.0, unet\.up\.1.*"
                                         r"unet\.fuse\.2"):
        net(x, inverse, points, batch)
    for fine in ("unet.up.0", "unet.fuse.0", "unet.up.1", "unet.fuse.2"):
        net = SPVCNN(4, 3, cr=0.125, blocks=1).eval()
        add_voxel_prune(net, fine, 0.5)
        assert net(x, inverse, points, batch).shape == (8, 3)


def test_point_rows_of_a_tensor_with_no_voxels_names_the_points():
    """A VoxelPrune whose threshold drops every voxel before SPVCNN's
    bottleneck leaves point_rows (and the voxel_rows operator) a tensor of
    no voxels: the points fall in none, a ValueError naming the VoxelPrune
    as for a partial drop, or the points alone without one; it was torch's
    IndexError ('index is out of bounds for dimension with size 0')."""
    from pointsparse.models import SPVCNN, add_voxel_prune
    from pointsparse.models.spvcnn import point_rows

    points = torch.tensor([[40.0 * i + 0.5, 0.5, 0.5] for i in range(8)])
    x, inverse = ps.voxelize(points, torch.randn(8, 4), voxel_size=1.0)
    batch = torch.zeros(8, dtype=torch.long)
    net = SPVCNN(4, 3, cr=0.125, blocks=1).eval()
    add_voxel_prune(net, "unet.stem", threshold=1e30)
    with pytest.raises(ValueError, match=r"some points fall in no voxel .*VoxelPrune.* dropped"):
        net(x, inverse, points, batch)
    empty = ps.SparseTensor(torch.zeros(0, 2), torch.zeros(0, 4, dtype=torch.int32), 2)
    point_coords = torch.tensor([[0, 3, -1, 5]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"some points fall in no voxel of the tensor \(points and voxels"):
        point_rows(empty, point_coords)
    with pytest.raises(ValueError, match=r"some points fall in no voxel"):
        torch.ops.pointsparse.voxel_rows(empty.coords, [2, 2, 2], point_coords)
    assert point_rows(empty, point_coords[:0]).shape == (0,)


@pytest.mark.parametrize("where", ["down.0", "down.2.0", "fuse.0.0.main.3"])
def test_minkunet_names_a_voxel_prune_whose_voxels_meet_unpruned_ones(where):
    """A VoxelPrune on a strided conv's input (its skip connection taken
    before it: the decoder comes back to the kept voxels) or inside a
    residual branch (the shortcut keeps every voxel) joins pruned and
    unpruned voxels in a cat or add: the ValueError names the VoxelPrune
    selection as the cause (it named two site counts only). Pruning after
    the skip is taken (down.0.1) runs."""
    from pointsparse.models import add_voxel_prune

    x = _cloud(600, 4, extent=24)
    net = MinkUNet(4, 3, cr=0.125, blocks=1).eval()
    with pytest.raises(ValueError, match=rf"module_name '{re.escape(where)}' is .*would make every forward fail"):
        add_voxel_prune(net, where, 0.5)  # (refused when added now; a VoxelPrune put there by hand:)
    prune = ps.nn.VoxelPrune(0.5)
    net.get_submodule(where).register_forward_pre_hook(lambda module, args: (prune(args[0]),) + args[1:])
    with pytest.raises(ValueError, match=r"(cat|add): item 1 .*VoxelPrune"):
        net(x)
    net = MinkUNet(4, 3, cr=0.125, blocks=1).eval()
    add_voxel_prune(net, "down.0.1", 0.5)
    assert net(x).feats.shape == (len(x), 3)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.uint32, torch.int32])
def test_spvcnn_takes_inverse_and_point_batch_of_any_integer_dtype(dtype):
    """inverse and point_batch pass SPVCNN's check as integer tensors of any
    dtype, and then give the int64 ones' logits: a uint8 inverse was read as
    a boolean mask (IndexError 'The shape of the mask'), int8 / int16 ones
    refused as indices, uint16 / 32 ones failed in torch's min or promotion."""
    from pointsparse.models import SPVCNN

    g = torch.Generator().manual_seed(3)
    points = torch.rand(200, 3, generator=g) * 5
    x, inverse = ps.voxelize(points, torch.randn(200, 4, generator=g), voxel_size=1.0)
    batch = x.coords[inverse, 0].long()
    net = SPVCNN(4, 3, cr=0.125, blocks=1).eval()
    want = net(x, inverse, points, batch)
    assert len(x) < 128  # (every row fits each dtype)
    assert torch.equal(net(x, inverse.to(dtype), points, batch), want)
    assert torch.equal(net(x, inverse, points, batch.to(dtype)), want)


def test_spvcnn_with_a_pruned_classifier_follows_double_after_a_forward():
    """A classifier pruned by torch's l1_unstructured holds ``weight`` as the
    hook's product of the last forward, which ``.double()`` does not convert:
    SPVCNN read its point branch's dtype from it, ran the float64 MLPs on
    float32 point feats ('mat1 and mat2 must have the same dtype'); the
    point branch follows ``weight_orig``, the parameter, and gives the
    float64 logits of the unpruned weights times the mask."""
    from pointsparse import prune
    from pointsparse.models import SPVCNN

    g = torch.Generator().manual_seed(4)
    points = torch.rand(200, 3, generator=g) * 5
    x, inverse = ps.voxelize(points, torch.randn(200, 4, generator=g), voxel_size=1.0)
    batch = x.coords[inverse, 0].long()
    net = SPVCNN(4, 3, cr=0.125, blocks=1).eval()
    prune.l1_unstructured(net.classifier, "weight", 0.3)
    with torch.no_grad():
        net(x, inverse, points, batch)  # (the hook's weight, float32, left on the layer)
        want = copy.deepcopy(net).double()
        prune.remove(want.classifier, "weight")
        net.double()
        x64 = ps.SparseTensor(x.feats.double(), x.coords)
        out = net(x64, inverse, points, batch)
        assert out.dtype == torch.float64
        assert torch.equal(out, want(ps.SparseTensor(x.feats.double(), x.coords), inverse, points, batch))


def test_spvcnn_bf16_inference_form_casts_a_learned_voxel_prune_of_its_voxel_branch():
    """SPVCNN.to_bf16_inference casts the voxel branch: the learned
    VoxelPrune add_voxel_prune registers on the model (voxel_prune.*, on a
    module of the U-Net) too. Its scorer stayed float32 on the branch's
    bfloat16 feats: the bf16 form (eval / predict --inference bf16) of such
    a checkpoint was a TypeError at its first call. The point branch stays
    float32."""
    from pointsparse.models import SPVCNN, add_voxel_prune

    g = torch.Generator().manual_seed(1)
    points = torch.rand(300, 3, generator=g) * 8
    x, inverse = ps.voxelize(points, torch.randn(300, 4, generator=g), voxel_size=1.0)
    batch = torch.zeros(300, dtype=torch.long)
    net = SPVCNN(4, 3, cr=0.125, blocks=1).eval()
    pruner = add_voxel_prune(net, "unet.fuse.3", 0.5, "learned", net.unet.fuse[3][0].main[0].in_channels)
    with torch.no_grad():
        want = net(x, inverse, points, batch)
        bf16 = spnn.fuse_for_inference(net).to_bf16_inference()
        got = bf16(x.with_feats(x.feats.bfloat16()), inverse, points, batch)
    assert bf16.voxel_prune.unet_fuse_3.scorer.weight.dtype == torch.bfloat16
    assert bf16.classifier.weight.dtype == torch.float32 and pruner.scorer.weight.dtype == torch.float32
    assert got.dtype == torch.float32 and got.shape == want.shape and bool(got.isfinite().all())


def test_model_from_state_of_a_channel_pruned_model_without_widths_fuses():
    """A channel-pruned checkpoint whose config records no widths: the
    loaded model's convs take the widths of their tensors (in_channels /
    out_channels stayed the config's: fuse_for_inference refused the model,
    'bn has 8 features but conv 16 output channels')."""
    from pointsparse.models import model_from_state
    from pointsparse.prune import graph

    torch.manual_seed(8)
    x = _cloud(400, 4, extent=24)
    net = MinkUNet(4, 3, cr=0.5, blocks=1)
    graph.prune_model(net, x, 0.5)
    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.5, "blocks": 1}
    model = model_from_state({"config": config, "model": net.state_dict()}).eval()
    convs = [m for m in model.modules() if isinstance(m, spnn.Conv3d)]
    assert model.stem[0][0].weight.shape[2] < model.widths[0]  # narrower than the config builds
    for conv in convs:
        assert tuple(conv.weight.shape) == (conv.kernel_volume, conv.in_channels, conv.out_channels)
    want = net.eval()(x).feats
    torch.testing.assert_close(spnn.fuse_for_inference(model)(x).feats, want, rtol=1e-4, atol=1e-4)
    # float64 weights load into the float32 model it builds, narrowed ones too (they stayed float64:
    # its forward was a TypeError)
    model = model_from_state({"config": config, "model": net.double().state_dict()}).eval()
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {torch.float32}
    torch.testing.assert_close(model(x).feats, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["minkunet", "spvcnn"])
def test_narrowed_weights_that_do_not_chain_are_refused_at_load(tmp_path, name):
    """A conv narrowed without its BatchNorm (weights no channel pruning
    gives) loaded and then failed at the first forward, naming no file:
    load_model names the file and the layer; a consistently pruned model of
    either kind still loads (the check's forward passes)."""
    from pointsparse import checkpoint
    from pointsparse.models import SPVCNN, load_model
    from pointsparse.prune import graph

    torch.manual_seed(3)
    net = (MinkUNet if name == "minkunet" else SPVCNN)(4, 3, cr=0.25, blocks=1)
    config = {"model": name, "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.25, "blocks": 1}
    g = torch.Generator().manual_seed(0)
    points = torch.rand(800, 3, generator=g) * 20
    x, inverse = ps.voxelize(points, torch.randn(800, 4, generator=g), voxel_size=1.0)
    pruned = copy.deepcopy(net)
    graph.prune_model(pruned, x if name == "minkunet" else (x, inverse, points, torch.zeros(800, dtype=torch.long)),
                      0.5)
    state = pruned.state_dict()
    checkpoint.save(tmp_path / "ok.pt", {"config": config, "model": state})
    load_model(tmp_path / "ok.pt")  # (consistent: loads)
    prefix = "" if name == "minkunet" else "unet."
    bad = dict(net.state_dict())
    bad[prefix + "stem.1.0.weight"] = bad[prefix + "stem.1.0.weight"][:, :, :4].clone()
    checkpoint.save(tmp_path / "bad.pt", {"config": config, "model": bad})
    with pytest.raises(ValueError, match=rf"bad.pt: the weights' channel widths do not chain: layer {prefix}stem.1.1 "):
        load_model(tmp_path / "bad.pt")
    # a layer that checks its input before the torch layer inside it runs (a pointsparse Linear): named, not the
    # last torch layer entered before it (the decoder's last ReLU's)
    bad = dict(net.state_dict())
    head = "classifier.fn.weight" if name == "minkunet" else "classifier.weight"
    bad[head] = bad[head][:, :8].clone()
    checkpoint.save(tmp_path / "bad_head.pt", {"config": config, "model": bad})
    with pytest.raises(ValueError, match=rf"bad_head.pt: the weights' channel widths do not chain: layer classifier "):
        load_model(tmp_path / "bad_head.pt")


def test_a_fused_model_s_weights_and_misfits_are_named_briefly(tmp_path):
    """A fused inference model's state_dict given to load_model got torch's
    list of all 165 missing BatchNorm tensors; it is named as what it is.
    Other misfits name the counts and the first five keys of each kind."""
    from pointsparse import checkpoint
    from pointsparse.models import load_model

    net = MinkUNet(4, 3, cr=0.25, blocks=1).eval()
    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.25, "blocks": 1}
    checkpoint.save(tmp_path / "fused.pt", {"config": config, "model": spnn.fuse_for_inference(net).state_dict()})
    with pytest.raises(ValueError, match=r"fused.pt: .* a fused inference model's \(nn.fuse_for_inference .* 33 "
                                         r"BatchNorms\)") as info:
        load_model(tmp_path / "fused.pt")
    assert len(str(info.value)) < 400
    state = dict(net.state_dict())
    del state["stem.0.0.weight"]
    state["extra.weight"] = torch.zeros(2)
    checkpoint.save(tmp_path / "other.pt", {"config": config, "model": state})
    with pytest.raises(ValueError, match=r"tensors 1 missing \(stem.0.0.weight\); 1 unexpected \(extra.weight\)"):
        load_model(tmp_path / "other.pt")
    del state["extra.weight"]
    for key in [k for k in state if k.startswith("down.")]:
        del state[key]
    checkpoint.save(tmp_path / "few.pt", {"config": config, "model": state})
    with pytest.raises(ValueError, match=r"tensors \d+ missing \(stem.0.0.weight, down.0.0.0.weight, .* and \d+ more\)$"):
        load_model(tmp_path / "few.pt")


def test_a_fused_spvcnn_s_weights_are_named_as_a_fused_model_s(tmp_path):
    """fuse_for_inference folds the BatchNorms of SPVCNN's voxel branch
    (and its point MLPs' BatchNorm1d into their Linear): its state_dict given to
    load_model was reported as 165 missing tensors (the first five listed),
    not as a fused inference model's weights, as a fused MinkUNet's are."""
    from pointsparse import checkpoint
    from pointsparse.models import SPVCNN, load_model

    net = SPVCNN(4, 3, cr=0.25, blocks=1).eval()
    config = {"model": "spvcnn", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.25, "blocks": 1}
    checkpoint.save(tmp_path / "fused.pt", {"config": config, "model": spnn.fuse_for_inference(net).state_dict()})
    with pytest.raises(ValueError, match=r"fused.pt: .* a fused inference model's \(nn.fuse_for_inference .* 36 "
                                         r"BatchNorms\)"):
        load_model(tmp_path / "fused.pt")
    # one BatchNorm's statistics lost is no fused model: the tensors are named
    state = dict(net.state_dict())
    del state["unet.stem.0.1.running_mean"]
    checkpoint.save(tmp_path / "few.pt", {"config": config, "model": state})
    with pytest.raises(ValueError, match=r"tensors 1 missing \(unet.stem.0.1.running_mean\)$"):
        load_model(tmp_path / "few.pt")


@pytest.mark.parametrize("name", ["minkunet", "spvcnn"])
def test_checkpoint_of_other_classes_or_input_channels_is_refused(tmp_path, name):
    """Channel pruning keeps a model's input channels and its classes: a
    checkpoint whose weights (or recorded widths) give its classifier fewer
    outputs than its config's classes, or its first conv fewer input
    channels than its in_channels, holds another model. It loaded as a
    "narrower" model: 2 logits a voxel for 3 classes, silently (scored as
    3-class predictions), or a forward that failed inside on the
    config's in_channels."""
    from pointsparse import checkpoint
    from pointsparse.models import SPVCNN, build_model, load_model, model_from_state

    cls = SPVCNN if name == "spvcnn" else MinkUNet
    prefix, classifier = ("unet.", "classifier") if cls is SPVCNN else ("", "classifier.fn")
    config = {"model": name, "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    assert isinstance(model_from_state({"config": config, "model": cls(4, 3, cr=0.125, blocks=1).state_dict()}), cls)
    for weights, match in ((cls(4, 2, cr=0.125, blocks=1).state_dict(), rf"{classifier}.* 2 outputs.* 3 classes"),
                           (cls(3, 3, cr=0.125, blocks=1).state_dict(),
                            rf"{prefix}stem.0.0.* 3 input channels.* in_channels is 4")):
        with pytest.raises(ValueError, match=match):
            model_from_state({"config": config, "model": weights})
        path = tmp_path / "other.pt"
        checkpoint.save(path, {"config": config, "model": weights})
        with pytest.raises(ValueError, match=match) as info:
            load_model(path)
        assert str(path) in str(info.value)
    for widths, match in (({classifier: {"out": 2}}, rf"{classifier}.* 2 outputs.* 3 classes"),
                          ({f"{prefix}stem.0.0": {"in": 2}}, rf"{prefix}stem.0.0.* 2 input channels")):
        with pytest.raises(ValueError, match=match):
            build_model({**config, "widths": widths})


def test_spvcnn_refuses_voxels_of_another_stride_as_minkunet_does():
    """SPVCNN takes stride-1 voxels, as MinkUNet (its voxel branch) does:
    a stride-2 tensor with points in its voxels ran the whole network at
    strides 2..32 and gave logits, silently (MinkUNet refuses it)."""
    from pointsparse.models import SPVCNN

    g = torch.Generator().manual_seed(0)
    points = torch.rand(300, 3, generator=g) * 12
    x, inverse = ps.voxelize(points, torch.randn(300, 4, generator=g), voxel_size=1.0)
    coarse, inverse2 = torch.unique(torch.cat([x.coords[:, :1], x.coords[:, 1:] // 2 * 2], 1), dim=0,
                                    return_inverse=True)
    x2 = ps.SparseTensor(torch.randn(len(coarse), 4, generator=g), coarse.int(), stride=2)
    net = SPVCNN(4, 3, cr=0.125, blocks=1).eval()
    batch = torch.zeros(300, dtype=torch.long)
    assert net(x, inverse, points, batch).shape == (300, 3)
    with pytest.raises(ValueError, match=r"SPVCNN needs a stride-1 input tensor \(voxels\); got stride \(2, 2, 2\)"):
        net(x2, inverse2[inverse], points, batch)


def test_model_from_state_gives_a_folded_bias_the_models_dtype():
    """A bias stored where the model builds none (folded in by pruning's
    remove_masked) is made in the model's dtype, as every other tensor
    loads into it: from float64 weights it was made float64 beside the
    float32 weight (the forward a TypeError, 'bias (torch.float64, cpu)
    must match the weight')."""
    from pointsparse.models import model_from_state

    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    net = MinkUNet(4, 3, cr=0.125, blocks=1).eval()
    weights = dict(net.state_dict())
    weights["stem.0.0.bias"] = torch.randn(net.widths[0])
    want = model_from_state({"config": config, "model": weights}).eval()
    double = {k: v.double() if v.is_floating_point() else v for k, v in weights.items()}
    model = model_from_state({"config": config, "model": double}).eval()
    assert model.stem[0][0].bias.dtype == torch.float32
    x = _cloud(300, 4, extent=20)
    torch.testing.assert_close(model(x).feats, want(x).feats)


def test_load_model_names_a_bad_path_or_map_location(tmp_path):
    """load_model's map_location is a device (a torch.device, a string such
    as "cpu", a device index) or None: torch.load's other forms (a dict, a
    function) are a TypeError naming it and what it takes (they were
    torch's 'to() received an invalid combination of arguments'), a string
    that is no device a ValueError naming it (a RuntimeError, 'Invalid
    device string'); a path that is no path a TypeError naming it."""
    from pointsparse import checkpoint
    from pointsparse.models import load_model

    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"config": config, "model": MinkUNet(4, 3, cr=0.125, blocks=1).state_dict()})
    for device in ("cpu", torch.device("cpu"), None):
        assert not load_model(str(path), map_location=device).training
    for bad in ({"cuda:0": "cpu"}, lambda storage, location: storage, True, 1.5):
        with pytest.raises(TypeError, match="map_location must be a device"):
            load_model(path, map_location=bad)
    with pytest.raises(ValueError, match="map_location 'gpu7' is no device"):
        load_model(path, map_location="gpu7")
    with pytest.raises(TypeError, match="path must be the checkpoint file's path"):
        load_model(None)


def test_load_model_names_a_map_location_this_torch_cannot_reach(tmp_path):
    """A map_location naming a device this machine or torch build lacks
    (CUDA without CUDA, a CUDA index past the device count) is a ValueError
    naming map_location, as SparseTensor.to names its target: it was
    torch's bare AssertionError ('Torch not compiled with CUDA enabled') or
    RuntimeError from inside the model's move."""
    from pointsparse import checkpoint
    from pointsparse.models import load_model

    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"config": config, "model": MinkUNet(4, 3, cr=0.125, blocks=1).state_dict()})
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for far in [f"cuda:{count}", torch.device("cuda", count)] + (["cuda"] if count == 0 else []):
        with pytest.raises(ValueError, match="map_location 'cuda.*' is not possible here"):
            load_model(path, map_location=far)
    with pytest.raises(ValueError, match="map_location"):  # (a device index: torch may refuse it as a device)
        load_model(path, map_location=count)


def test_a_loaded_pruned_model_deep_copies(tmp_path):
    """load_model / model_from_state of a checkpoint holding pruning masks
    computed each masked weight (weight_orig * weight_mask) with autograd
    on: a non-leaf tensor, so copy.deepcopy of the model just loaded (an EMA
    or teacher copy) raised torch's "Only Tensors created explicitly by the
    user (graph leaves) support the deepcopy protocol". It copies now, and
    the copy and the loaded model compute the pruned model's output; a
    training forward still gives the masked weight's gradient."""
    import copy

    from pointsparse import checkpoint, prune
    from pointsparse.models import load_model, model_from_state

    torch.manual_seed(0)
    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    net = MinkUNet(4, 3, cr=0.125, blocks=1).eval()
    for module in net.modules():
        if isinstance(module, spnn.Conv3d):
            prune.l1_unstructured(module, "weight", 0.5)
    x = _cloud(400, 4, extent=40)
    with torch.no_grad():
        want = net(x).feats
    path = tmp_path / "pruned.pt"
    checkpoint.save(path, {"config": config, "model": net.state_dict()})
    for model in (load_model(path), model_from_state({"config": config, "model": net.state_dict()}).eval()):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            assert torch.equal(twin(x).feats, want) and torch.equal(model(x).feats, want)
    model.train()
    model(x).feats.sum().backward()
    conv = model.stem[0][0]
    assert conv.weight_orig.grad is not None and torch.equal(conv.weight_orig.grad[conv.weight_mask == 0],
                                                             torch.zeros(int((conv.weight_mask == 0).sum())))


def test_load_model_names_a_device_index_it_cannot_use(tmp_path):
    """A device index (which load_model's docstring takes) where this machine
    has no accelerator was "map_location 0 is no device (e.g. 'cpu', ...)",
    as if an index were no device; it says the index is not possible here,
    with torch's reason. An index past a C long was torch's bare ValueError
    ("Overflow when unpacking long long"); a negative one is no device."""
    from pointsparse import checkpoint
    from pointsparse.models import load_model

    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"config": config, "model": MinkUNet(4, 3, cr=0.125, blocks=1).state_dict()})
    try:
        torch.device(0)
    except RuntimeError as error:  # (no accelerator: torch refuses the index itself)
        with pytest.raises(ValueError, match=rf"map_location 0 \(a device index\) is not possible here: {error}"):
            load_model(path, map_location=0)
    for bad in (-1, 10**30):
        with pytest.raises(ValueError, match=rf"map_location {bad} is no device"):
            load_model(path, map_location=bad)


def test_load_model_puts_a_masked_weight_on_map_location(tmp_path):
    """load_model computed each masked weight (weight_orig * weight_mask, a
    plain attribute, not a parameter) before moving the model: after
    map_location="cuda" (here "meta", the same move) weight_orig and the mask
    were there and module.weight still on the CPU until the first forward
    (conv.weight @ a cuda tensor: a device mismatch). It is computed where
    the model is now."""
    from pointsparse import checkpoint, prune
    from pointsparse.models import load_model

    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    net = MinkUNet(4, 3, cr=0.125, blocks=1)
    for module in net.modules():
        if isinstance(module, spnn.Conv3d):
            prune.l1_unstructured(module, "weight", 0.3)
    path = tmp_path / "pruned.pt"
    checkpoint.save(path, {"config": config, "model": net.state_dict()})
    for device in ("meta", "cpu"):
        conv = load_model(path, map_location=device).stem[0][0]
        assert conv.weight.device == conv.weight_orig.device == torch.device(device)
    assert torch.equal(conv.weight, net.stem[0][0].weight_orig * net.stem[0][0].weight_mask)


def test_model_from_state_sets_the_widths_of_a_masked_narrowed_linear():
    """A channel-pruned SPVCNN whose point branch is masked too (weight_orig
    + weight_mask) loads with its Linear layers' in_features / out_features
    read from their tensors, as its convs' in_channels / out_channels are:
    they stayed the config's widths (Linear(in_features=8, out_features=64)
    holding a (32, 4) weight)."""
    from pointsparse import prune
    from pointsparse.models import SPVCNN, model_from_state
    from pointsparse.prune import graph

    g = torch.Generator().manual_seed(0)
    points = torch.rand(1500, 3, generator=g) * 30
    x, inverse = ps.voxelize(points, torch.randn(1500, 4, generator=g), voxel_size=1.0)
    batch = torch.zeros(1500, dtype=torch.long)
    torch.manual_seed(10)
    net = SPVCNN(4, 3, cr=0.25, blocks=1).eval()
    graph.prune_model(net, (x, inverse, points, batch), 0.5)
    for module in net.modules():
        if isinstance(module, torch.nn.Linear):
            prune.l1_unstructured(module, "weight", 0.3)
    config = {"model": "spvcnn", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.25, "blocks": 1}
    model = model_from_state({"config": config, "model": net.state_dict()}).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears[0].weight_orig.shape[1] < model.widths[0]  # narrower than the config builds
    for linear in linears:
        assert tuple(linear.weight_orig.shape) == (linear.out_features, linear.in_features)
    torch.testing.assert_close(model(x, inverse, points, batch), net(x, inverse, points, batch))


def test_point_to_voxel_names_bad_arguments():
    """point_to_voxel (public, as TorchSparse's) checks its arguments: a
    TypeError / ValueError naming them instead of torch's index_add errors
    ('index 3 is out of bounds', a device-side assert on a GPU), an
    IndexError ('tuple index out of range') for 1-D feats or an
    AttributeError for a list."""
    from pointsparse.models import point_to_voxel

    voxels = ps.SparseTensor(torch.zeros(3, 2), torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0]],
                                                             dtype=torch.int32))
    feats = torch.arange(8.0).reshape(4, 2)
    out = point_to_voxel(voxels, feats, torch.tensor([0, 0, 1, 2], dtype=torch.int32))
    assert torch.equal(out.feats, torch.tensor([[1.0, 2.0], [4.0, 5.0], [6.0, 7.0]]))
    for dtype in (torch.uint8, torch.int16, torch.uint16, torch.uint32):  # (index_add took int32 / int64 only)
        assert torch.equal(point_to_voxel(voxels, feats, torch.tensor([0, 0, 1, 2], dtype=dtype)).feats, out.feats)
    bad = [((voxels.feats, feats, torch.tensor([0, 0, 1, 2])), TypeError, "tensor must be a SparseTensor"),
           ((voxels, feats.tolist(), torch.tensor([0, 0, 1, 2])), TypeError, r"point_feats must be a tensor \(N, C\)"),
           ((voxels, feats[:, 0], torch.tensor([0, 0, 1, 2])), ValueError, r"point_feats must be \(N, C\); got \(4,\)"),
           ((voxels, feats, torch.tensor([0.0, 0, 1, 2])), TypeError, r"rows must be an integer tensor"),
           ((voxels, feats, [0, 0, 1, 2]), TypeError, r"rows must be an integer tensor"),
           ((voxels, feats, torch.tensor([0, 1])), ValueError, r"rows must be \(4,\), a row a point; got \(2,\)"),
           ((voxels, feats, torch.tensor([0, 1, 2, 3])), ValueError, r"rows must lie in \[0, 3\)"),
           ((voxels, feats, torch.tensor([0, 1, 2, -1])), ValueError, r"rows must lie in \[0, 3\)")]
    for args, error, match in bad:
        with pytest.raises(error, match=match):
            point_to_voxel(*args)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_point_to_voxel_refuses_point_feats_of_no_float_dtype(dtype):
    """Integer or bool point feats were averaged into float32 means silently
    (two points of 2**25 + 1 and 2**25 + 2 into 2**25, a bool mask into
    fractions), complex ones refused as 'feats', a name point_to_voxel does
    not take: a TypeError naming point_feats and the float dtypes."""
    from pointsparse.models import point_to_voxel

    voxels = ps.SparseTensor(torch.zeros(2, 1), torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32))
    feats = torch.tensor([[2**25 + 1], [2**25 + 2], [3]])
    rows = torch.tensor([0, 0, 1])
    with pytest.raises(TypeError, match=f"point_feats must be a float tensor .*float16.*got dtype {dtype}"):
        point_to_voxel(voxels, feats.to(dtype), rows)
    assert point_to_voxel(voxels, feats.double(), rows).feats.tolist() == [[2**25 + 1.5], [3.0]]


def test_spvcnn_forward_reads_the_point_rows_range_only_in_check_points():
    """SPVCNN's forward checks its inputs once (check_points, in its
    checked_point_coords: inverse's rows read back to the host); the rows it derives for point_to_voxel
    (point_rows: rows of the tensor by construction) were read back again,
    min and max, at each of its two point-to-voxel steps, every forward."""
    import os
    import traceback

    from torch.overrides import TorchFunctionMode

    from pointsparse.models import SPVCNN

    g = torch.Generator().manual_seed(0)
    points = torch.rand(300, 3, generator=g) * 12
    batch = torch.zeros(300, dtype=torch.long)
    x, inverse = ps.voxelize(points, torch.randn(300, 4, generator=g), voxel_size=1.0)
    net = SPVCNN(4, 3, cr=0.125, blocks=1).eval()
    readers, package = [], os.path.dirname(ps.__file__) + os.sep

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.min, torch.Tensor.max) and len(args) == 1 and not kwargs:
                caller = [f for f in traceback.extract_stack() if f.filename.startswith(package)][-1]
                if caller.filename.endswith("spvcnn.py"):  # (voxelize's own reads are its own)
                    readers.append(caller.name)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        net(x, inverse, points, batch)
    assert sorted(readers) == ["checked_point_coords", "checked_point_coords"], readers


def _with_voxel_skips(net):
    """``net`` (a MinkUNet) with VoxelSkip around the convs of its decoder
    blocks, as bench/voxel_prune.py inserts them: a magnitude score, a
    threshold and a learned score."""
    for j, (score, threshold) in enumerate((("magnitude", None), ("magnitude", 0.5), ("learned", None))):
        for block in net.fuse[j]:
            channels = block.main[0].in_channels if score == "learned" else None
            block.main = spnn.VoxelSkip(block.main, 0.4, score, channels, threshold)
    return net


def test_a_model_with_voxel_skips_round_trips_through_its_checkpoint(tmp_path):
    """A model with VoxelSkip inserted, saved with checkpoint.save, was
    refused by load_model (the config rebuilt the model without them: its
    tensors missing, the wrapped ones unexpected). The config records them
    (``voxel_skip``: models.voxel_skips(model)) and load_model wraps the
    same modules again, with their settings and weights: the same outputs.
    The unwrapped model's weights load into them too (a trained model's
    checkpoint given voxel_skip by hand), where every score is a magnitude."""
    from pointsparse import checkpoint
    from pointsparse.models import load_model, voxel_skips

    torch.manual_seed(4)
    net = MinkUNet(4, 3, cr=0.25, blocks=1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_var.uniform_(0.01, 0.1)
    dense = copy.deepcopy(net).eval()
    net = _with_voxel_skips(net).eval()
    recorded = voxel_skips(net)
    assert recorded == {"fuse.0.0.main": {"keep_ratio": 0.4, "score": "magnitude", "threshold": None,
                                          "in_channels": None},
                        "fuse.1.0.main": {"keep_ratio": 0.4, "score": "magnitude", "threshold": 0.5,
                                          "in_channels": None},
                        "fuse.2.0.main": {"keep_ratio": 0.4, "score": "learned", "threshold": None,
                                          "in_channels": net.fuse[2][0].main.module[0].in_channels}}
    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.25, "blocks": 1,
              "voxel_skip": recorded}
    checkpoint.save(tmp_path / "skip.pt", {"config": config, "model": net.state_dict()})
    model = load_model(tmp_path / "skip.pt")
    assert voxel_skips(model) == recorded and not model.training
    x = _cloud(600, 4, seed=2, extent=16)
    with torch.no_grad():
        want = net(x).feats
        assert torch.equal(model(x).feats, want)
        assert not torch.allclose(dense(x).feats, want)  # (the skips change the outputs)
    # the dense model's weights under a config of magnitude skips
    magnitude = {k: v for k, v in recorded.items() if v["score"] == "magnitude"}
    checkpoint.save(tmp_path / "dense.pt", {"config": dict(config, voxel_skip=magnitude), "model": dense.state_dict()})
    model = load_model(tmp_path / "dense.pt")
    expect = copy.deepcopy(dense)
    for path, settings in magnitude.items():
        parent, _, name = path.rpartition(".")
        setattr(expect.get_submodule(parent), name, spnn.VoxelSkip(expect.get_submodule(path), **settings))
    with torch.no_grad():
        assert torch.equal(model(x).feats, expect(x).feats)


def test_inserted_voxel_layers_the_config_does_not_record_are_refused_naming_them(tmp_path):
    """Weights of a model with VoxelSkip layers whose config does not record
    them, or with a learned VoxelPrune registered on it (bench's
    voxel_prune_<j>: where it runs, a forward hook, no config records),
    are refused naming the file, the layers and what to do, not as a list
    of missing and unexpected tensors; a bad voxel_skip record names the
    entry."""
    from pointsparse import checkpoint
    from pointsparse.models import build_model, load_model

    torch.manual_seed(5)
    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.25, "blocks": 1}
    net = _with_voxel_skips(MinkUNet(4, 3, cr=0.25, blocks=1))
    checkpoint.save(tmp_path / "skip.pt", {"config": config, "model": net.state_dict()})
    with pytest.raises(ValueError, match=r"skip.pt: .*VoxelSkip layers the config does not record \(fuse.0.0.main, "
                                         r"fuse.1.0.main, fuse.2.0.main\).*voxel_skips\(model\)"):
        load_model(tmp_path / "skip.pt")
    net = MinkUNet(4, 3, cr=0.25, blocks=1)
    net.add_module("voxel_prune_0", spnn.VoxelPrune(0.5, "learned", 96))
    checkpoint.save(tmp_path / "prune.pt", {"config": config, "model": net.state_dict()})
    with pytest.raises(ValueError, match=r"prune.pt: .*a learned VoxelPrune's scorer \(voxel_prune_0\)"):
        load_model(tmp_path / "prune.pt")
    for skips, kind, match in (
            (["fuse.0.0.main"], TypeError, r"config voxel_skip must be a dict \(module -> settings\); got list"),
            ({"fuse.0.0.nothing": {}}, ValueError, r"config voxel_skip names 'fuse.0.0.nothing', which the model"),
            ({"": {}}, ValueError, r"config voxel_skip names '', which the model"),
            ({"fuse.0.0.main": 0.5}, TypeError, r"config voxel_skip\['fuse.0.0.main'\] must be a dict"),
            ({"fuse.0.0.main": {"ratio": 0.5}}, ValueError, r"config voxel_skip\['fuse.0.0.main'\] has 'ratio'"),
            ({"fuse.0.0.main": {"keep_ratio": 2.0}}, ValueError,
             r"config voxel_skip\['fuse.0.0.main'\]: .*keep_ratio")):
        with pytest.raises(kind, match=match):
            build_model({**config, "voxel_skip": skips})


def _with_voxel_prunes(net):
    """``net`` (a MinkUNet) with VoxelPrune on the input of its decoder
    stages 0-2 (models.add_voxel_prune, as bench/voxel_prune.py adds them):
    a magnitude score, a threshold and a learned score."""
    from pointsparse.models import add_voxel_prune

    add_voxel_prune(net, "fuse.0", 0.4)
    add_voxel_prune(net, "fuse.1", threshold=1e-3)
    add_voxel_prune(net, "fuse.2", 0.6, "learned", net.fuse[2][0].main[0].in_channels)
    return net


def test_add_voxel_prune_runs_a_registered_pruner_on_the_module_input():
    """models.add_voxel_prune registers the VoxelPrune on the model
    (voxel_prune.<module, dots as _>: a learned scorer is a parameter,
    trains, is in the state_dict, moves with .to, is the copy's own in a
    deepcopy) and runs it on the module's input as a hand-made forward
    pre-hook does; the rest of the state_dict keeps its keys (a dense
    checkpoint loads with strict=False, only the scorer missing);
    voxel_prunes(model) gives back what was added."""
    from pointsparse.models import voxel_prunes

    torch.manual_seed(6)
    dense = MinkUNet(4, 3, cr=0.25, blocks=1).eval()
    net = _with_voxel_prunes(copy.deepcopy(dense))
    learned = net.fuse[2][0].main[0].in_channels
    assert voxel_prunes(net) == {"fuse.0": {"keep_ratio": 0.4, "score": "magnitude", "threshold": None,
                                            "in_channels": None},
                                 "fuse.1": {"keep_ratio": 0.5, "score": "magnitude", "threshold": 1e-3,
                                            "in_channels": None},
                                 "fuse.2": {"keep_ratio": 0.6, "score": "learned", "threshold": None,
                                            "in_channels": learned}}
    keys = set(net.state_dict())
    assert keys - set(dense.state_dict()) == {"voxel_prune.fuse_2.scorer.weight", "voxel_prune.fuse_2.scorer.bias"}
    assert set(dense.state_dict()) <= keys
    assert any(p is net.voxel_prune.fuse_2.scorer.weight for p in net.parameters())
    # the same outputs as hooks made by hand, on the same pruners
    by_hand = copy.deepcopy(dense)
    for j in range(3):
        pruner = net.voxel_prune[f"fuse_{j}"]
        by_hand.fuse[j].register_forward_pre_hook(lambda module, args, p=pruner: (p(args[0]),))
    x = _cloud(600, 4, seed=3, extent=16)
    with torch.no_grad():
        want = net(x).feats
        assert torch.equal(by_hand(x).feats, want)
        assert not torch.allclose(dense(x).feats, want)
    # the scorer trains (in eval mode: the coarse stages' few voxels give no batch statistics)
    net(x).feats.square().mean().backward()
    assert net.voxel_prune.fuse_2.scorer.weight.grad.abs().sum() > 0
    # a deepcopy runs its own pruners; .to moves them
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.voxel_prune.fuse_2.scorer.weight.neg_()
        assert not torch.equal(twin(x).feats, want) and torch.equal(net(x).feats, want)
    double = copy.deepcopy(net).double()
    assert double.voxel_prune.fuse_2.scorer.weight.dtype == torch.float64
    with torch.no_grad():
        assert torch.allclose(double(x.with_feats(x.feats.double())).feats.float(), want, atol=1e-4)
    # the dense model's weights load into the pruned one, the scorer the only thing missing
    loaded = _with_voxel_prunes(MinkUNet(4, 3, cr=0.25, blocks=1))
    result = loaded.load_state_dict(dense.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["voxel_prune.fuse_2.scorer.bias", "voxel_prune.fuse_2.scorer.weight"]
    assert not result.unexpected_keys


def test_add_voxel_prune_refuses_what_it_cannot_add_naming_it():
    """A model that is no module, a module name that is no str, that the
    model lacks or is the model itself, a module given a VoxelPrune already,
    a VoxelSkip (ResidualBlock calls its add_to, which no hook sees), bad
    VoxelPrune settings: TypeError / ValueError naming the argument,
    the model unchanged. A module whose input is no SparseTensor is refused
    at its call, naming it (the fn of a pointsparse.nn pointwise layer when
    added). voxel_prunes refuses a model that is no module
    and a pruner it can no longer record (its module moved, or none runs
    it)."""
    from pointsparse.models import add_voxel_prune, voxel_prunes

    net = MinkUNet(4, 3, cr=0.25, blocks=1)
    add_voxel_prune(net, "fuse.0", 0.5)
    before = list(net.state_dict())
    for args, kind, match in (
            ((object(), "fuse.0"), TypeError, r"model must be a torch.nn.Module; got object"),
            ((net, 0), TypeError, r"module_name must be a str .*; got int"),
            ((net, "fuse.9"), ValueError, r"module_name 'fuse.9' names no submodule of the model"),
            ((net, ""), ValueError, r"module_name '' names no submodule of the model"),
            ((net, "fuse.0"), ValueError, r"'fuse.0' has a VoxelPrune already \(add_voxel_prune\)"),
            ((net, "fuse.1", 2.0), ValueError, r"keep_ratio"),
            ((net, "fuse.1", 0.5, "learned"), TypeError, r"score='learned' needs in_channels")):
        with pytest.raises(kind, match=match):
            add_voxel_prune(*args)
        assert list(net.state_dict()) == before and list(voxel_prunes(net)) == ["fuse.0"]
    skip = MinkUNet(4, 3, cr=0.25, blocks=1)
    skip.fuse[0][0].main = spnn.VoxelSkip(skip.fuse[0][0].main, 0.5)
    with pytest.raises(ValueError, match=r"module_name 'fuse.0.0.main' is a VoxelSkip.*add_to.*past any forward hook"):
        add_voxel_prune(skip, "fuse.0.0.main")  # (its ResidualBlock runs add_to: the hook would never run)
    assert voxel_prunes(skip) == {} and not hasattr(skip, "voxel_prune")
    with pytest.raises(ValueError, match=r"module_name 'fn' is inside the model \(a pointsparse.nn Linear\)"):
        add_voxel_prune(spnn.Linear(4, 2), "fn")  # (its torch Linear, fn, gets the feats)

    class Head(torch.nn.Module):  # (a caller's own layer, whose fn gets the feats: seen at the call only)
        def __init__(self):
            super().__init__()
            self.fn = torch.nn.Linear(4, 2)

        def forward(self, x):
            return x.with_feats(self.fn(x.feats))

    head = Head()
    add_voxel_prune(head, "fn")
    with pytest.raises(TypeError, match=r"the VoxelPrune add_voxel_prune put on 'fn' takes a SparseTensor .*; "
                                        r"got Tensor"):
        head(_cloud(20, 4))
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module; got dict"):
        voxel_prunes({})
    # the module moved after add_voxel_prune: the recorded name would load another key (wrapped in a VoxelSkip
    # by hand, the VoxelSkip refuses it: its branch would give fewer sites than it keeps)
    with pytest.raises(ValueError, match=r"VoxelSkip: module holds a VoxelPrune on the input of 'module'"):
        spnn.VoxelSkip(net.fuse[0], 0.5)
    net.fuse[0] = torch.nn.Sequential(net.fuse[0])
    with pytest.raises(ValueError, match=r"voxel_prune.fuse_0 runs on 'fuse.0.0'.*VoxelSkip.*before"):
        voxel_prunes(net)
    net = MinkUNet(4, 3, cr=0.25, blocks=1)
    add_voxel_prune(net, "fuse.1", 0.5)
    net.fuse[1]._forward_pre_hooks.clear()
    with pytest.raises(ValueError, match=r"voxel_prune.fuse_1 runs on no module of the model"):
        voxel_prunes(net)


def test_a_model_with_voxel_prunes_round_trips_through_its_checkpoint(tmp_path):
    """A model given VoxelPrune by add_voxel_prune, saved with
    checkpoint.save, loaded as the unpruned model where every score was a
    magnitude (no tensor of it in the weights) and was refused for a learned
    score. The config records them (``voxel_prune``: voxel_prunes(model)) and
    load_model adds them again, with the VoxelSkip layers (``voxel_skip``)
    and the widths (which name a learned scorer): the same outputs, the
    scorer's weights restored.
    An unpruned model's checkpoint given a magnitude voxel_prune by hand
    loads too (the other keys are unchanged)."""
    from pointsparse import checkpoint
    from pointsparse.models import add_voxel_prune, load_model, voxel_prunes, voxel_skips

    torch.manual_seed(7)
    net = MinkUNet(4, 3, cr=0.25, blocks=1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_var.uniform_(0.01, 0.1)
    dense = copy.deepcopy(net).eval()
    net.fuse[3][0].main = spnn.VoxelSkip(net.fuse[3][0].main, 0.5)
    net = _with_voxel_prunes(net)
    with torch.no_grad():
        net.voxel_prune.fuse_2.scorer.weight.normal_()
    net.eval()
    recorded = voxel_prunes(net)
    assert list(recorded) == ["fuse.0", "fuse.1", "fuse.2"]
    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.25, "blocks": 1,
              "voxel_skip": voxel_skips(net), "voxel_prune": recorded}
    checkpoint.save(tmp_path / "prune.pt", {"config": config, "model": net.state_dict()})
    model = load_model(tmp_path / "prune.pt")
    assert voxel_prunes(model) == recorded and voxel_skips(model) == voxel_skips(net) and not model.training
    assert torch.equal(model.voxel_prune.fuse_2.scorer.weight, net.voxel_prune.fuse_2.scorer.weight)
    x = _cloud(600, 4, seed=2, extent=16)
    with torch.no_grad():
        want = net(x).feats
        assert torch.equal(model(x).feats, want)
        assert not torch.allclose(dense(x).feats, want)
    # channel-pruned too: the widths (which name the learned scorer) after the prunes
    from pointsparse.prune.graph import widths
    checkpoint.save(tmp_path / "wide.pt", {"config": dict(config, widths=widths(net)), "model": net.state_dict()})
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "wide.pt")(x).feats, want)
    # the dense model's weights under a config of magnitude prunes
    magnitude = {k: v for k, v in recorded.items() if v["score"] == "magnitude" and k.startswith("fuse.0")}
    checkpoint.save(tmp_path / "dense.pt", {"config": dict(config, voxel_skip=None, voxel_prune=magnitude),
                                            "model": dense.state_dict()})
    model = load_model(tmp_path / "dense.pt")
    expect = copy.deepcopy(dense)
    add_voxel_prune(expect, "fuse.0", **magnitude["fuse.0"])
    with torch.no_grad():
        assert torch.equal(model(x).feats, expect(x).feats)
        assert not torch.equal(model(x).feats, dense(x).feats)


def test_voxel_prunes_the_config_does_not_record_or_records_badly_are_refused(tmp_path):
    """Weights with a learned VoxelPrune added by add_voxel_prune, under a
    config without voxel_prune, are refused naming the pruner and what to
    record; a bad voxel_prune entry names the entry, before any weight is
    read."""
    from pointsparse import checkpoint
    from pointsparse.models import add_voxel_prune, build_model, load_model

    torch.manual_seed(8)
    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.25, "blocks": 1}
    net = MinkUNet(4, 3, cr=0.25, blocks=1)
    add_voxel_prune(net, "fuse.1", 0.5, "learned", net.fuse[1][0].main[0].in_channels)
    checkpoint.save(tmp_path / "prune.pt", {"config": config, "model": net.state_dict()})
    with pytest.raises(ValueError, match=r"prune.pt: .*a learned VoxelPrune's scorer \(voxel_prune.fuse_1\).*"
                                         r"voxel_prune=pointsparse.models.voxel_prunes\(model\)"):
        load_model(tmp_path / "prune.pt")
    for prunes, kind, match in (
            (["fuse.0"], TypeError, r"config voxel_prune must be a dict \(module -> settings\); got list"),
            ({"fuse.9": {}}, ValueError, r"config voxel_prune names 'fuse.9', which the model does not have"),
            ({"": {}}, ValueError, r"config voxel_prune names '', which the model"),
            ({1: {}}, ValueError, r"config voxel_prune names 1, which the model"),
            ({"fuse.0": 0.5}, TypeError, r"config voxel_prune\['fuse.0'\] must be a dict of VoxelPrune's settings"),
            ({"fuse.0": {"ratio": 0.5}}, ValueError, r"config voxel_prune\['fuse.0'\] has 'ratio'; its settings"),
            ({"fuse.0": {"keep_ratio": 2.0}}, ValueError, r"config voxel_prune\['fuse.0'\]: .*keep_ratio"),
            ({"fuse.0": {"score": "learned"}}, TypeError,
             r"config voxel_prune\['fuse.0'\]: score='learned' needs in_channels")):
        with pytest.raises(kind, match=match):
            build_model({**config, "voxel_prune": prunes})


def test_a_loaded_model_with_voxel_prunes_exports_as_eager(tmp_path):
    """The model load_model gives with its config's voxel_prune (magnitude
    and learned) exports and compiles (fullgraph: the hooks traced): the
    program and the compiled model give eager's logits bit for bit on a
    cloud of another size."""
    from pointsparse import checkpoint, export
    from pointsparse.models import load_model, voxel_prunes

    torch.manual_seed(9)
    net = _with_voxel_prunes(MinkUNet(4, 3, cr=0.25, blocks=1)).eval()
    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.25, "blocks": 1,
              "voxel_prune": voxel_prunes(net)}
    checkpoint.save(tmp_path / "prune.pt", {"config": config, "model": net.state_dict()})
    model = load_model(tmp_path / "prune.pt")
    program = export.export_model(model, _cloud(500, 4, seed=4, extent=16))
    x = _cloud(800, 4, seed=5, extent=16)
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    with torch.no_grad():
        want = net(x).feats
        assert torch.equal(program.module()(x.feats, x.coords), want)
        assert torch.equal(compiled(x).feats, want)
    # Each selection's transposed conv back up takes the graph's downsampling map restricted to the kept
    # voxels (kmap_restrict), as eager does, not a search onto the kept coords (a kmap_build given them).
    calls = [n for n in program.graph.nodes if n.op == "call_function"]
    restricted = [n for n in calls if n.target is torch.ops.pointsparse.kmap_restrict.default]
    searched_onto = [n for n in calls if n.target is torch.ops.pointsparse.kmap_build.default and n.args[1] is not None]
    assert len(restricted) == 3 and not searched_onto


@pytest.mark.parametrize("name", ["stem.0.1", "stem.0.2", "fuse.0.0.relu"])
def test_fuse_for_inference_keeps_a_voxel_prune_on_a_batch_norm_or_relu(name):
    """A VoxelPrune that add_voxel_prune put on the input of a BatchNorm or
    a ReLU (a conv's, or a residual block's after its sum): fuse_for_inference
    folded that module into the conv before it (nn.Identity in its place)
    and the pruner with it, so the fused model (eval / predict --inference
    fused) ran unpruned without a word. Such a module is kept: the fused
    model prunes the same voxels."""
    from pointsparse.models import add_voxel_prune
    from pointsparse.nn import fuse_for_inference

    torch.manual_seed(10)
    net = MinkUNet(4, 3, cr=0.25, blocks=1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    add_voxel_prune(net, name, 0.5)
    fused = fuse_for_inference(net)
    ran = []
    fused.voxel_prune[name.replace(".", "_")].register_forward_hook(lambda module, args, out: ran.append(len(out)))
    x = _cloud(600, 4, seed=3, extent=16)
    with torch.no_grad():
        want, got = net.eval()(x), fused(x)
    assert len(ran) == 1 and ran[0] > 0
    assert torch.equal(got.coords, want.coords)
    assert torch.allclose(got.feats, want.feats, atol=1e-4)


def test_add_voxel_prune_refuses_a_sequential_model():
    """add_voxel_prune registers its pruners on the model (its child
    voxel_prune); an nn.Sequential runs every child as a layer, so the model
    it accepted then failed at each forward with torch's "Module [ModuleDict]
    is missing the required forward function" (after its layers had run).
    It is refused naming the model and what to do, the model unchanged; a
    Sequential inside a model (MinkUNet's stages) takes one as before."""
    from pointsparse.models import add_voxel_prune

    net = torch.nn.Sequential(spnn.Conv3d(4, 8, 3), spnn.Conv3d(8, 3, 3))
    with pytest.raises(ValueError, match=r"model is an nn.Sequential, .*voxel_prune.*as a layer"):
        add_voxel_prune(net, "1")
    assert len(net) == 2 and not hasattr(net, "voxel_prune") and not net[1]._forward_pre_hooks
    with torch.no_grad():
        assert len(net(_cloud(200, 4))) > 0


def test_add_voxel_prune_on_a_module_without_weights_takes_the_models_dtype():
    """A learned VoxelPrune on the input of a module without parameters (a
    ReLU) was left in float32 while the model was float64: its first
    forward refused the feats. It takes the model's dtype then."""
    from pointsparse.models import add_voxel_prune

    torch.manual_seed(2)
    net = MinkUNet(4, 3, cr=0.25, blocks=1).double().eval()
    assert isinstance(net.stem[1][2], ps.nn.ReLU) and not list(net.stem[1][2].parameters())
    pruner = add_voxel_prune(net, "stem.1.2", 0.5, "learned", net.stem[1][0].out_channels)
    assert pruner.scorer.weight.dtype == torch.float64
    x = _cloud(600, 4, seed=3, extent=16)
    with torch.no_grad():
        out = net(x.with_feats(x.feats.double()))
    assert out.feats.dtype == torch.float64


def test_add_voxel_skip_with_a_learned_score_takes_the_models_dtype():
    """add_voxel_skip's learned score (its VoxelPrune's scorer) was left in
    float32 on a float64 model, as add_voxel_prune's was on a module without
    weights: its first forward refused the feats. It takes the wrapped
    module's dtype (add_voxel_prune's rule)."""
    from pointsparse.models import add_voxel_skip

    torch.manual_seed(2)
    net = MinkUNet(4, 3, cr=0.25, blocks=1).double().eval()
    skip = add_voxel_skip(net, "fuse.1.0.main", 0.5, "learned", net.fuse[1][0].main[0].in_channels)
    assert skip.prune.scorer.weight.dtype == torch.float64
    x = _cloud(600, 4, seed=3, extent=16)
    with torch.no_grad():
        out = net(x.with_feats(x.feats.double()))
    assert out.feats.dtype == torch.float64


def test_add_voxel_skip_wraps_the_named_module_as_the_config_rebuilds_it():
    """models.add_voxel_skip (what build_model and `prune voxels` call) puts
    a VoxelSkip of the settings around the named module, returns it, and
    voxel_skips records it; a name the model lacks or the model itself is
    refused by name."""
    from pointsparse.models import add_voxel_skip, build_model, voxel_skips

    torch.manual_seed(3)
    net = MinkUNet(4, 3, cr=0.25, blocks=1).eval()
    inner = net.fuse[1][0].main
    skip = add_voxel_skip(net, "fuse.1.0.main", 0.4, threshold=0.5)
    assert net.fuse[1][0].main is skip and skip.module is inner
    recorded = voxel_skips(net)
    assert recorded == {"fuse.1.0.main": {"keep_ratio": 0.4, "score": "magnitude", "threshold": 0.5,
                                          "in_channels": None}}
    rebuilt = build_model({"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.25,
                           "blocks": 1, "voxel_skip": recorded})
    assert voxel_skips(rebuilt) == recorded
    for name in ("fuse.9", ""):
        with pytest.raises(ValueError, match="names no submodule"):
            add_voxel_skip(net, name)
    with pytest.raises(TypeError, match="module_name must be a str"):
        add_voxel_skip(net, 3)


@pytest.mark.parametrize("variant", ["masked", "fused", "bf16"])
def test_threads_sharing_one_model_get_its_bits(variant):
    """A service may call one loaded model from several Python threads (the
    engine releases the GIL in its kernels): four threads, each on its own
    clouds or all on one shared input (one coordinate cache, its maps built
    by whichever thread asks first), get the outputs of one thread alone, bit
    for bit (a model-wide cache written by two calls at once would show
    here). Masked (the pruning hook rewrites the weight every call), fused,
    and bf16 on the bf16 kernels where the CPU has them."""
    import threading

    from pointsparse import prune

    torch.manual_seed(0)
    net = MinkUNet(4, 5, cr=0.25).eval()
    for m in net.modules():
        if isinstance(m, spnn.Conv3d) and m.kernel_volume > 1:
            prune.panel_structured(m, "weight", 0.75)
    if variant != "masked":
        net = spnn.fuse_for_inference(net)
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    net = net.to(dtype)
    clouds = [_cloud(900 + 150 * i, 4, seed=i, extent=24) for i in range(6)]
    clouds = [ps.SparseTensor(c.feats.to(dtype), c.coords) for c in clouds]
    with torch.no_grad():
        want = [net(ps.SparseTensor(c.feats, c.coords)).feats for c in clouds]
    shared = ps.SparseTensor(clouds[0].feats, clouds[0].coords)
    wrong = []

    def work(t):
        try:
            with torch.no_grad():
                for r in range(3):
                    for i in range(t % 2, len(clouds), 2):
                        if not torch.equal(net(ps.SparseTensor(clouds[i].feats, clouds[i].coords)).feats, want[i]):
                            wrong.append((t, r, i))
                    if not torch.equal(net(shared).feats, want[0]):
                        wrong.append((t, r, "shared"))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            wrong.append((t, repr(error)))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, wrong[:5]


def test_training_step_is_bit_identical_for_any_core_thread_count(monkeypatch):
    """The engine's promise (any thread count, the same bits) carried through
    a whole MinkUNet training step: logits, loss and the gradient of every
    parameter equal for 1 and 2 core threads (torch's own ops, batch norm's
    reductions among them, stay on the one torch thread of this module)."""
    x = _cloud(9000, 4, seed=3, extent=30, batch=2)
    labels = (x.coords[:, 1] % 3).long()
    torch.manual_seed(0)
    net = MinkUNet(4, 3, cr=0.25, blocks=1)
    results = []
    for threads in (1, 2, 1):
        monkeypatch.setenv("POINTSPARSE_NUM_THREADS", str(threads))
        out = net(ps.SparseTensor(x.feats.clone(), x.coords.clone()))
        loss = F.cross_entropy(out.feats, labels)
        results.append([out.feats.detach(), loss.detach(), *torch.autograd.grad(loss, list(net.parameters()))])
    assert ps.num_threads() == 1 and len(x) > 4 * 512  # (several blocks of output rows at the finest stride)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_point_to_voxel_averages_low_precision_points_in_float32(dtype):
    """SPVCNN's point-to-voxel mean of fp16 / bf16 point features: the sum
    and the count were taken in the feats' dtype (an fp16 count is inf past
    65504 points: the mean of 70,000 points of 0.5 was 0; bf16 rounds the
    sum of many points); now summed and divided in float32 and rounded
    once, as torch.mean gives it."""
    from pointsparse.models import point_to_voxel

    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32)
    x = ps.SparseTensor(torch.zeros(2, 1, dtype=dtype), coords)
    rows = torch.cat([torch.zeros(70_000, dtype=torch.int64), torch.ones(3, dtype=torch.int64)])
    values = torch.cat([torch.full((70_000, 1), 0.5), torch.tensor([[1.0], [2.0], [4.0]])]).to(dtype)
    got = point_to_voxel(x, values, rows).feats
    want = torch.stack([values[:70_000].float().mean(0), values[70_000:].float().mean(0)]).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_shape_like_names_a_model_or_state_dict_of_the_wrong_kind():
    """shape_like (the trainer's, before a resumed run's optimizer) given a
    list, a model or None where it takes a state_dict, or no model, raised
    AttributeError ('list' object has no attribute 'items')."""
    from pointsparse.models.loading import shape_like

    net = MinkUNet(4, 3, cr=0.125, blocks=1)
    for state in ([1, 2], MinkUNet(4, 3, cr=0.125, blocks=1), None):
        with pytest.raises(TypeError, match=rf"state_dict must be a dict .*; got {type(state).__name__}"):
            shape_like(net, state)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module; got NoneType"):
        shape_like(None, net.state_dict())
    shape_like(net, net.state_dict())  # (its own weights: nothing to change)


def test_load_model_of_a_bare_state_dict_says_what_a_checkpoint_holds(tmp_path):
    """torch.save(model.state_dict()) given to load_model (as a TorchSparse
    or MinkowskiEngine user saves weights) was refused as 'not a pointsparse
    training checkpoint', saying neither what one holds nor how to load the
    weights; it now says both."""
    from pointsparse.models import load_model

    net = MinkUNet(4, 3, cr=0.125, blocks=1)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=r"weights.pt is not a pointsparse training checkpoint \(a dict with 'config' "
                                         r"and 'model'\): it holds a bare state_dict .*load_state_dict") as info:
        load_model(tmp_path / "weights.pt")
    assert "model_from_state" in str(info.value)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list.pt is not a pointsparse training checkpoint \(a dict with 'config' "
                                         r"and 'model'\); it holds a list$"):
        load_model(tmp_path / "list.pt")


def test_load_model_of_a_minkowski_or_torchsparse_checkpoint_names_weight_from(tmp_path):
    """A MinkowskiEngine or TorchSparse checkpoint (its convs' weights under
    'kernel'; bare, or under 'state_dict' as their training scripts save
    it) given to load_model was refused as a bare state_dict to
    load_state_dict (or "its keys are 'state_dict'"), with no word that the
    kernels' offsets are in another order; it now names nn.weight_from."""
    from pointsparse.models import load_model

    theirs = {"conv0p1s1.kernel": torch.zeros(27, 4, 8), "bn0.bn.weight": torch.ones(8),
              "block1.0.conv1.kernel": torch.zeros(27, 8, 8), "final.kernel": torch.zeros(8, 3)}
    torch.save(theirs, tmp_path / "bare.pth")
    torch.save({"state_dict": theirs, "epoch": 3}, tmp_path / "wrapped.pth")
    for name in ("bare.pth", "wrapped.pth"):
        with pytest.raises(ValueError, match=rf"{name} is not a pointsparse training checkpoint .*its 3 'kernel' "
                                             r"tensors \(conv0p1s1.kernel, .*\) are MinkowskiEngine or TorchSparse "
                                             r"conv weights.*pointsparse.nn.weight_from\(kernel, kernel_size, "
                                             r"'minkowski'"):
            load_model(tmp_path / name)


@pytest.mark.parametrize("name", ["minkunet", "spvcnn"])
def test_recorded_widths_that_do_not_chain_are_refused_at_load(tmp_path, name):
    """A config whose recorded widths narrow a conv and not its BatchNorm
    (a hand-edited or damaged config; channel pruning records none such),
    with weights of those shapes, loaded, and the first forward failed in
    the BatchNorm naming no file or layer: build_model now refuses it naming
    the layer, load_model the file as well, as for narrowed weights."""
    from pointsparse import checkpoint
    from pointsparse.models import SPVCNN, build_model, load_model

    prefix = "" if name == "minkunet" else "unet."
    config = {"model": name, "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.25, "blocks": 1}
    bad = {**config, "widths": {prefix + "stem.0.0": {"out": 4}}}
    with pytest.raises(ValueError, match=rf"the config's widths do not chain: layer {prefix}stem.0.1 "):
        build_model(bad)
    model = (MinkUNet if name == "minkunet" else SPVCNN)(4, 3, cr=0.25, blocks=1)
    state = dict(model.state_dict())
    state[prefix + "stem.0.0.weight"] = state[prefix + "stem.0.0.weight"][:, :, :4].clone()
    checkpoint.save(tmp_path / "bad.pt", {"config": bad, "model": state})
    with pytest.raises(ValueError, match=rf"bad.pt: the config's widths do not chain: layer {prefix}stem.0.1 "):
        load_model(tmp_path / "bad.pt")
    # widths that chain (the conv, its BatchNorm and the next conv's input) still build and run
    good = {**config, "widths": {prefix + "stem.0.0": {"out": 4}, prefix + "stem.0.1": {"out": 4},
                                 prefix + "stem.1.0": {"in": 4}}}
    assert build_model(good).get_submodule(prefix + "stem.1.0").in_channels == 4


def test_add_voxel_prune_refuses_a_module_the_model_never_calls():
    """A VoxelPrune on a container the model indexes or iterates but never
    calls (MinkUNet's down / up / fuse lists, SPVCNN's unet, whose stages
    SPVCNN runs one by one) was added and recorded, and pruned nothing: the
    model ran on every voxel, silently. It is refused naming the module."""
    from pointsparse.models import SPVCNN, add_voxel_prune

    for model, name in ((MinkUNet(4, 3, cr=0.125, blocks=1), "down"), (MinkUNet(4, 3, cr=0.125, blocks=1), "fuse"),
                        (SPVCNN(4, 3, cr=0.125, blocks=1), "unet.up"), (SPVCNN(4, 3, cr=0.125, blocks=1), "unet")):
        before = list(model.state_dict())
        with pytest.raises(ValueError, match=rf"module_name {name!r} is .* never calls"):
            add_voxel_prune(model, name, 0.5)
        assert list(model.state_dict()) == before and not hasattr(model, "voxel_prune")
    add_voxel_prune(SPVCNN(4, 3, cr=0.125, blocks=1), "unet.fuse.3", 0.5)  # (a stage it calls)


def test_spvcnns_unet_classifier_which_it_never_calls_is_refused():
    """SPVCNN replaces its U-Net's classifier by an nn.Identity and never
    calls it (its own classifier runs on the points): add_voxel_prune and
    add_voxel_skip took ``unet.classifier``, voxel_prunes / voxel_skips
    recorded it, and the layer never ran (the model's output was the
    unpruned one, silently). Both refuse it now, naming it and the
    classifier that does run, the model unchanged."""
    from pointsparse.models import SPVCNN, add_voxel_prune, add_voxel_skip

    for add in (add_voxel_prune, add_voxel_skip):
        model = SPVCNN(4, 3, cr=0.125, blocks=1)
        before = list(model.state_dict())
        with pytest.raises(ValueError, match=r"module_name 'unet.classifier' is .*never calls.*'classifier'"):
            add(model, "unet.classifier", 0.5)
        assert list(model.state_dict()) == before and isinstance(model.unet.classifier, torch.nn.Identity)
        assert not hasattr(model, "voxel_prune")


def test_add_voxel_skip_refuses_what_the_model_cannot_run_wrapped():
    """A VoxelSkip around a container the model indexes or iterates
    (MinkUNet's down list: "'VoxelSkip' object is not iterable"), around
    SPVCNN's unet ("'VoxelSkip' object has no attribute 'stem'") or a
    module of SPVCNN's point branch, which takes (N, C) tensors (its
    classifier: "'VoxelSkip' object has no attribute 'weight_format'") was
    added, and the forward failed deep inside. It is refused naming the
    module, the model unchanged."""
    from pointsparse.models import SPVCNN, add_voxel_skip

    for model, name, match in ((MinkUNet(4, 3, cr=0.125, blocks=1), "down", "never calls"),
                               (SPVCNN(4, 3, cr=0.125, blocks=1), "unet", "never calls"),
                               (SPVCNN(4, 3, cr=0.125, blocks=1), "unet.fuse", "never calls"),
                               (SPVCNN(4, 3, cr=0.125, blocks=1), "classifier", "point branch"),
                               (SPVCNN(4, 3, cr=0.125, blocks=1), "point_mlps.0", "point branch"),
                               (SPVCNN(4, 3, cr=0.125, blocks=1), "point_mlps.1.0", "point branch")):
        before = list(model.state_dict())
        with pytest.raises(ValueError, match=rf"module_name {name!r} is .*{match}"):
            add_voxel_skip(model, name, 0.5)
        assert list(model.state_dict()) == before
    add_voxel_skip(SPVCNN(4, 3, cr=0.125, blocks=1), "unet.fuse.3.0.main", 0.5)  # (a module of its voxel branch)


def test_a_module_that_runs_on_plain_feats_is_refused_when_added():
    """The torch module a pointsparse.nn pointwise layer runs on its feats
    (MinkUNet's ``classifier.fn``, a ReLU's ``fn``, a learned VoxelPrune's
    ``scorer``) takes a plain (N, C) tensor: add_voxel_prune and
    add_voxel_skip took it, and every forward failed (the pruner's TypeError
    at the call; a VoxelSkip's bare "expected a SparseTensor; got Tensor"
    from deep inside). Both refuse it when added, naming it and the layer to
    name instead, the model unchanged."""
    from pointsparse.models import add_voxel_prune, add_voxel_skip

    for add in (add_voxel_prune, add_voxel_skip):
        for name, holder in (("classifier.fn", "classifier"), ("stem.0.2.fn", "stem.0.2"),
                             ("voxel_prune.fuse_0.scorer", "voxel_prune.fuse_0")):
            net = MinkUNet(4, 3, cr=0.25, blocks=1)
            add_voxel_prune(net, "fuse.0", 0.5, "learned", net.fuse[0][0].main[0].in_channels)
            before = list(net.state_dict())
            with pytest.raises(ValueError, match=rf"module_name {name!r} is inside {holder!r}.*plain \(N, C\) "
                                                 rf"tensor"):
                add(net, name, 0.5)
            assert list(net.state_dict()) == before and not net.classifier.fn._forward_pre_hooks
            assert isinstance(net.classifier.fn, torch.nn.Linear) and isinstance(net.stem[0][2].fn, torch.nn.ReLU)
        add(MinkUNet(4, 3, cr=0.25, blocks=1), "classifier", 0.5)  # (the layer itself takes the SparseTensor)


def test_a_voxel_prune_itself_is_refused_when_added():
    """add_voxel_prune on a VoxelPrune (one the model runs as a layer, or one
    add_voxel_prune registered) pruned its input twice, silently (a keep
    ratio of 0.5 kept a quarter); on a VoxelSkip's ``prune`` (run by
    ``select``, past any hook) it never ran. add_voxel_skip around one
    failed at every forward (fewer sites than the kept ones) or, around a
    registered one, never ran. Both refuse a VoxelPrune naming it, the
    model unchanged."""
    from pointsparse.models import add_voxel_prune, add_voxel_skip

    for add in (add_voxel_prune, add_voxel_skip):
        for name in ("stem.0", "voxel_prune.fuse_0", "fuse.1.0.main.prune"):
            net = MinkUNet(4, 3, cr=0.25, blocks=1)
            net.stem = torch.nn.Sequential(spnn.VoxelPrune(0.5), *net.stem)
            add_voxel_skip(net, "fuse.1.0.main", 0.5)
            add_voxel_prune(net, "fuse.0", 0.5)
            before = list(net.state_dict())
            with pytest.raises(ValueError, match=rf"module_name {name!r} is a VoxelPrune.*keep_ratio or threshold"):
                add(net, name, 0.5)
            assert list(net.state_dict()) == before and list(net.voxel_prune) == ["fuse_0"]
            assert isinstance(net.stem[0], spnn.VoxelPrune) and isinstance(net.voxel_prune.fuse_0, spnn.VoxelPrune)
            assert not any(m._forward_pre_hooks for m in net.modules() if isinstance(m, spnn.VoxelPrune))


def test_add_voxel_skip_refuses_a_module_add_voxel_prune_gave_a_pruner():
    """add_voxel_skip around a module holding a VoxelPrune of
    add_voxel_prune (on it, or on a module inside it) wrapped it: every
    forward then failed (the branch gave fewer sites than the VoxelSkip
    kept) and voxel_prunes refused the model (the pruner's key named
    another place). It is refused naming the pruned module and the order
    to add them in, the model unchanged; a pruner above it is no matter."""
    from pointsparse.models import add_voxel_prune, add_voxel_skip, voxel_prunes

    for pruned in ("fuse.1", "fuse.1.0"):
        net = MinkUNet(4, 3, cr=0.25, blocks=1)
        add_voxel_prune(net, pruned, 0.5)
        before = list(net.state_dict())
        with pytest.raises(ValueError, match=rf"module_name 'fuse.1' holds the VoxelPrune add_voxel_prune put "
                                             rf"on {pruned!r}.*VoxelSkip before"):
            add_voxel_skip(net, "fuse.1", 0.5)
        assert list(net.state_dict()) == before and isinstance(net.fuse[1], torch.nn.Sequential)
        assert list(voxel_prunes(net)) == [pruned]
    net = MinkUNet(4, 3, cr=0.25, blocks=1).eval()
    add_voxel_prune(net, "fuse.1.0", 0.5)
    add_voxel_skip(net, "fuse.1.0.main", 0.5)  # (the pruner on the block's input runs before the skip)
    assert list(voxel_prunes(net)) == ["fuse.1.0"] and len(net(_cloud())) == len(_cloud())


def test_a_voxel_prune_inside_a_voxel_skips_branch_is_refused_up_front():
    """add_voxel_prune on a module inside a VoxelSkip's branch (the skip's
    module, or a conv of it), or add_voxel_skip around a module holding a
    VoxelPrune layer, was taken: every forward then failed as "VoxelSkip:
    module must return a SparseTensor on the 30 kept sites ...; got 15
    sites", naming neither the pruner nor what to do. Both are refused
    naming the module, the VoxelSkip and why, the model unchanged; a
    VoxelSkip inside the module (its own VoxelPrune) is no matter."""
    from pointsparse.models import add_voxel_prune, add_voxel_skip, voxel_prunes

    for pruned in ("fuse.1.0.main.module", "fuse.1.0.main.module.0", "fuse.1.0.main.module.2"):
        net = MinkUNet(4, 3, cr=0.25, blocks=1)
        add_voxel_skip(net, "fuse.1.0.main", 0.5)
        before = list(net.state_dict())
        with pytest.raises(ValueError, match=rf"module_name {pruned!r} is inside the branch of the VoxelSkip "
                                             r"'fuse.1.0.main'.*fewer sites than it keeps.*'fuse.1.0'"):
            add_voxel_prune(net, pruned, 0.5)
        assert list(net.state_dict()) == before and voxel_prunes(net) == {}
        assert not any(m._forward_pre_hooks for m in net.modules())
    net = MinkUNet(4, 3, cr=0.25, blocks=1)
    net.fuse[1][0].main = torch.nn.Sequential(spnn.VoxelPrune(0.5), *net.fuse[1][0].main)
    with pytest.raises(ValueError, match=r"module_name 'fuse.1.0.main' holds a VoxelPrune at 'fuse.1.0.main.0'.*"
                                         r"fewer sites than"):
        add_voxel_skip(net, "fuse.1.0.main", 0.5)
    assert isinstance(net.fuse[1][0].main, torch.nn.Sequential)
    net = MinkUNet(4, 3, cr=0.25, blocks=1).eval()
    add_voxel_skip(net, "fuse.1.0.main", 0.5)
    add_voxel_skip(net, "fuse.1.0", 0.5)  # (a block holding a VoxelSkip: its VoxelPrune keeps every site it gives)
    add_voxel_prune(net, "fuse.1", 0.5)  # (above the skips: runs before them)
    assert len(net(_cloud())) == len(_cloud())


def test_a_pruner_replaced_in_the_models_voxel_prune_is_the_one_that_runs():
    """add_voxel_prune's hook held the VoxelPrune it made: a user who put
    another in its place (model.voxel_prune["fuse_0"] = VoxelPrune(0.2), the
    layer the state_dict and repr show) still had the old one run, silently,
    and voxel_prunes said the model was another one's. The hook runs the
    registered one and voxel_prunes records it; one deleted is a ValueError
    naming it at the call."""
    from pointsparse.models import add_voxel_prune, voxel_prunes

    x = _cloud()
    net = MinkUNet(4, 3, cr=0.25, blocks=1).eval()
    add_voxel_prune(net, "stem.1", 0.5)
    assert len(net(x)) == math.ceil(0.5 * len(x))
    net.voxel_prune["stem_1"] = spnn.VoxelPrune(0.2)
    assert len(net(x)) == math.ceil(0.2 * len(x))
    assert voxel_prunes(net)["stem.1"]["keep_ratio"] == 0.2
    assert len(copy.deepcopy(net)(x)) == math.ceil(0.2 * len(x))
    del net.voxel_prune["stem_1"]
    with pytest.raises(ValueError, match=r"'stem.1'.*voxel_prune.stem_1.*deleted"):
        net(x)


def test_spvcnn_training_on_one_point_names_the_points():
    """SPVCNN in training mode given one point (voxels of several sites)
    failed in its point MLPs' BatchNorm1d with torch's 'Expected more than
    1 value per channel when training'; it is a BatchStatisticsError naming
    the points, as MinkUNet's batch norms name a single site. In eval mode
    one point runs."""
    from pointsparse.models import SPVCNN
    from pointsparse.nn.modules import BatchStatisticsError

    g = torch.Generator().manual_seed(1)
    points = torch.rand(80, 3, generator=g) * 6
    x, inverse = ps.voxelize(points, torch.randn(80, 2, generator=g), voxel_size=1.0)
    net = SPVCNN(2, 3, cr=0.125, blocks=1).train()
    one = (x, inverse[:1], points[:1], torch.zeros(1, dtype=torch.long))
    with pytest.raises(BatchStatisticsError, match=r"SPVCNN in training mode got 1 point: its point MLPs' "
                                                   r"BatchNorm1d"):
        net(*one)
    assert net.eval()(*one).shape == (1, 3)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_a_wrapped_model_s_weights_say_which_prefix_to_strip(tmp_path, prefix):
    """Weights saved from DistributedDataParallel (keys 'module.*') or a
    torch.compile'd model ('_orig_mod.*') were refused with every key
    listed missing and unexpected, nothing naming the prefix; the message
    names it and how to strip it, and the stripped weights load."""
    from pointsparse import checkpoint
    from pointsparse.models import load_model

    net = MinkUNet(4, 3, cr=0.25, blocks=1).eval()
    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.25, "blocks": 1}
    state = {prefix + k: v for k, v in net.state_dict().items()}
    checkpoint.save(tmp_path / "wrapped.pt", {"config": config, "model": state})
    with pytest.raises(ValueError, match=rf"every key starts with '{prefix}' .*removeprefix\('{prefix}'\)"):
        load_model(tmp_path / "wrapped.pt")
    checkpoint.save(tmp_path / "plain.pt", {"config": config, "model": {k.removeprefix(prefix): v
                                                                         for k, v in state.items()}})
    load_model(tmp_path / "plain.pt")


def test_add_voxel_prune_refuses_spvcnn_s_point_branch():
    """add_voxel_prune on a module of SPVCNN's point branch (its classifier,
    its point MLPs: (N, C) tensors, no SparseTensor) was accepted and every
    forward then failed with the pruner's TypeError; it is refused up front
    as add_voxel_skip refuses it, the model unchanged."""
    from pointsparse.models import SPVCNN, add_voxel_prune

    for name in ("classifier", "point_mlps.0", "point_mlps.1.0"):
        model = SPVCNN(4, 3, cr=0.125, blocks=1)
        before = list(model.state_dict())
        with pytest.raises(ValueError, match=rf"module_name {name!r} is in SPVCNN's point branch"):
            add_voxel_prune(model, name, 0.5)
        assert list(model.state_dict()) == before and not hasattr(model, "voxel_prune")
    add_voxel_prune(SPVCNN(4, 3, cr=0.125, blocks=1), "unet.fuse.3", 0.5)  # (its voxel branch)


def test_complex_weights_are_refused_naming_the_tensor(tmp_path):
    """Complex weights (a spectral experiment's, a cast gone wrong) loaded
    into the real model with only torch's UserWarning, 'Casting complex
    values to real discards the imaginary part': the model ran on their real
    parts. model_from_state and load_model refuse them naming the tensor
    (and load_model the file), before anything loads."""
    import warnings

    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    weights = dict(MinkUNet(4, 3, cr=0.125, blocks=1).state_dict())
    weights["stem.0.0.weight"] = weights["stem.0.0.weight"] * (1 + 1j)
    expected = (r"the weights' 'stem\.0\.0\.weight' is torch\.complex64 where the model's is torch\.float32: "
                r"loading it would drop the imaginary part")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (torch's warning is no refusal)
        _refused_in_memory_and_from_file(tmp_path, {"config": config, "model": weights}, expected)


def test_a_mask_of_another_shape_than_its_weight_is_refused_naming_both(tmp_path):
    """A stored pruning mask whose shape is not its weight_orig's (a hand
    edit, a narrowing that cut one and not the other) failed inside the
    mask's product with torch's RuntimeError ('The size of tensor a (2) must
    match the size of tensor b (4)'), which load_model let through without
    naming the file. It is a ValueError naming both tensors and shapes."""
    from pointsparse import prune

    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1}
    net = MinkUNet(4, 3, cr=0.125, blocks=1)
    prune.l1_unstructured(net.stem[0][0], "weight", 0.5)
    weights = dict(net.state_dict())
    weights["stem.0.0.weight_mask"] = weights["stem.0.0.weight_mask"][:, :, :2]
    expected = (r"the weights' 'stem\.0\.0\.weight_mask' has shape \(27, 4, 2\) but 'stem\.0\.0\.weight_orig', "
                r"the tensor it masks, \(27, 4, 4\)")
    _refused_in_memory_and_from_file(tmp_path, {"config": config, "model": weights}, expected)


def _refused_in_memory_and_from_file(tmp_path, state, expected):
    """``model_from_state(state)`` and ``load_model`` of it saved raise a
    ValueError matching ``expected`` (from the file: after its name)."""
    from pointsparse import checkpoint
    from pointsparse.models import load_model, model_from_state

    with pytest.raises(ValueError, match=expected):
        model_from_state(state)
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, state)
    with pytest.raises(ValueError, match=rf"checkpoint {path}: {expected}"):
        load_model(path)


def test_point_rows_names_point_coords_of_another_shape_or_dtype():
    """point_rows takes the points' stride-1 voxel coords (N, 4) int32, as
    the voxel_rows operator does: (N, 3) coords without the batch column
    stopped in torch's broadcast ('The size of tensor a (2) must match the
    size of tensor b (3)'), int64 ones named 'coords', a list failed on
    '.device'; each is now a TypeError / ValueError naming point_coords
    (tensor, a SparseTensor, by name too)."""
    from pointsparse.models.spvcnn import point_rows

    points = torch.tensor([[0.5, 0.5, 0.5], [3.5, 1.5, 0.5], [7.5, 2.5, 4.5]])
    x, inverse = ps.voxelize(points, torch.randn(3, 2), voxel_size=1.0)
    y = spnn.Conv3d(2, 2, 2, stride=2)(x)
    point_coords = x.coords[inverse]
    assert torch.equal(y.coords[point_rows(y, point_coords), 1:], point_coords[:, 1:] // 2 * 2)
    with pytest.raises(ValueError, match=r"point_coords must be \(N, 4\).*got shape \(3, 3\)"):
        point_rows(y, point_coords[:, 1:])
    with pytest.raises(TypeError, match=r"point_coords must be int32.*int64"):
        point_rows(y, point_coords.long())
    with pytest.raises(TypeError, match=r"point_coords must be .*int32.*list"):
        point_rows(y, point_coords.tolist())
    with pytest.raises(TypeError, match=r"tensor must be a SparseTensor; got Tensor"):
        point_rows(y.coords, point_coords)
    with pytest.raises(ValueError, match=r"point_coords must be \(N, 4\)"):
        torch.ops.pointsparse.voxel_rows(y.coords, [2, 2, 2], point_coords[:, 1:])


@pytest.mark.parametrize("name", ["points", "inverse", "point_batch"])
def test_spvcnn_names_a_point_argument_on_another_device_than_the_voxels(name):
    """points, inverse and point_batch on another device than the voxels
    (the voxels moved to the GPU, the points left on the CPU) are a
    ValueError naming the argument and both devices; they failed deep in
    torch (a RuntimeError 'Tensor on device cpu is not on the expected
    device', or 'item() cannot be called' on the rows' range check). The
    meta device stands in for a second one here."""
    from pointsparse.models import SPVCNN

    g = torch.Generator().manual_seed(4)
    points = torch.rand(40, 3, generator=g) * 4
    x, inverse = ps.voxelize(points, torch.randn(40, 4, generator=g), voxel_size=1.0)
    args = {"inverse": inverse, "points": points, "point_batch": torch.zeros(40, dtype=torch.long)}
    net = SPVCNN(4, 3, cr=0.125, blocks=1).eval()
    assert net(x, *args.values()).shape == (40, 3)
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"^{name} (is|are) on meta but the voxels on cpu"):
        net(x, *args.values())


@pytest.mark.parametrize("name", ["point_feats", "rows"])
def test_point_to_voxel_names_an_argument_on_another_device_than_the_tensor(name):
    """point_to_voxel's point_feats or rows on another device than the
    tensor are a ValueError naming the argument and both devices (they were
    torch's index_add RuntimeError, or 'item() cannot be called' on the
    rows' range check); the meta device stands in for a second one."""
    from pointsparse.models import point_to_voxel

    voxels = ps.SparseTensor(torch.zeros(2, 2), torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32))
    args = {"point_feats": torch.ones(3, 2), "rows": torch.tensor([0, 1, 1])}
    assert point_to_voxel(voxels, *args.values()).feats.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"^{name} (is|are) on meta but the tensor on cpu"):
        point_to_voxel(voxels, *args.values())


def test_point_rows_names_point_coords_on_another_device_than_the_tensor():
    """point_rows' point_coords on another device than the tensor are a
    ValueError naming point_coords and both devices: torch's searchsorted
    failed on the two devices (RuntimeError), and a meta point_coords was
    named 'coords'. The meta device stands in for a second one."""
    from pointsparse.models.spvcnn import point_rows

    x = ps.SparseTensor(torch.zeros(2, 2), torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32))
    point_coords = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.int32)
    assert point_rows(x, point_coords).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"^point_coords is on meta but the tensor on cpu"):
        point_rows(x, point_coords.to("meta"))
