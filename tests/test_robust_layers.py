"""Robustness of the nn layers against bad or extreme arguments: a clear
ValueError / TypeError naming the argument (checked before allocating), never
a crash, a torch error from deep inside, a huge allocation or a silently
wrong result; and the edge cases kept right (tiny keep ratios, maps with no
pairs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pointsparse as ps
from pointsparse import nn as spnn
from pointsparse.nn import functional as F


def line(n=3, c=4, dtype=torch.float32):
    coords = torch.tensor([[0, i, 0, 0] for i in range(n)], dtype=torch.int32)
    return ps.SparseTensor(torch.randn(n, c, dtype=dtype), coords)


def test_tiny_keep_ratio_keeps_one_voxel_per_item():
    assert len(spnn.VoxelPrune(1e-12)(line())) == 1
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 2, 0, 0]], dtype=torch.int32)
    x = ps.SparseTensor(torch.randn(5, 4), coords)
    kept = spnn.VoxelPrune(1e-12)(x)
    assert kept.coords[:, 0].tolist() == [0, 1]
    assert F.keep_per_batch(torch.randn(0), torch.zeros(0, dtype=torch.int32), 1e-12).numel() == 0


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("empty", [False, True])
def test_conv_with_no_pairs_stays_in_the_graph(backend, empty):
    coords = torch.zeros(0, 4, dtype=torch.int32) if empty else torch.tensor([[0, 0, 2, 0]], dtype=torch.int32)
    feats = torch.randn(len(coords), 4, requires_grad=True)
    weight = torch.randn(4, 4, 2, requires_grad=True)
    with ps.backend(backend):
        y = F.conv3d(ps.SparseTensor(feats, coords), weight, (1, 2, 2), stride=3)
    assert y.feats.requires_grad and not y.feats.detach().any()
    y.feats.sum().backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats)) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_max_pool_with_no_pairs_stays_in_the_graph(backend):
    feats = torch.randn(1, 4, requires_grad=True)
    with ps.backend(backend):
        y = spnn.MaxPool3d((1, 2, 2), stride=3)(ps.SparseTensor(feats, torch.tensor([[0, 0, 2, 0]], dtype=torch.int32)))
    assert len(y) == 1 and y.feats.requires_grad and not y.feats.detach().any()
    y.feats.sum().backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_conv3d_refuses_a_kernel_no_map_takes_before_allocating():
    from pointsparse.kmap import MAX_KERNEL_VOLUME

    with pytest.raises(ValueError, match="kernel_size"):
        spnn.Conv3d(1, 1, (1, 1, MAX_KERNEL_VOLUME + 1))
    with pytest.raises(ValueError, match=f"kernel_size .*at most {MAX_KERNEL_VOLUME:,}"):
        spnn.Conv3d(1, 1, (1, 1, 2**30))  # a 4 GiB weight
    assert spnn.Conv3d(1, 1, (1, 1, MAX_KERNEL_VOLUME)).weight.shape == (MAX_KERNEL_VOLUME, 1, 1)


@pytest.mark.parametrize("pool", [spnn.GlobalAvgPool, spnn.GlobalMaxPool])
def test_global_pool_refuses_a_huge_output_before_allocating(pool):
    far = ps.SparseTensor(torch.randn(2, 4), torch.tensor([[0, 0, 0, 0], [2**31 - 1, 0, 0, 0]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(2147483648, 4\).*GiB limit"):
        pool()(far)
    near = ps.SparseTensor(torch.ones(2, 4), torch.tensor([[0, 0, 0, 0], [999, 0, 0, 0]], dtype=torch.int32))
    out = pool()(near)
    assert out.shape == (1000, 4) and out[[0, 999]].eq(1).all() and not out[1:999].any()


def test_instance_norm_names_its_per_item_statistics_not_an_output_when_they_are_too_large():
    # (its output is (N, C), one row a site; the (B, C) it refuses are the items' means and variances:
    # the global poolings' message said "the output (B, C)")
    far = ps.SparseTensor(torch.randn(2, 4), torch.tensor([[0, 0, 0, 0], [2**31 - 1, 0, 0, 0]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"instance_norm: its per-item statistics \(2147483648, 4\).*GiB limit") as err:
        spnn.InstanceNorm(4)(far)
    assert "output" not in str(err.value)


def test_linear_and_batchnorm_check_their_sizes_before_allocating():
    for args, error, match in [((4, 2**40), ValueError, "Linear weight .*over the limit"),
                               ((2**20, 2**12), ValueError, "over the limit"),
                               ((0, -3), ValueError, "in_features must be"), ((4, 0), ValueError, "out_features must be"),
                               ((4, True), TypeError, "out_features"), ((4.0, 2), TypeError, "in_features")]:
        with pytest.raises(error, match=match):
            spnn.Linear(*args)
    with pytest.raises(ValueError, match="num_classes|out_features"):
        from pointsparse.models import MinkUNet

        MinkUNet(4, 2**28, cr=0.1)
    for n, error in ((-1, ValueError), (0, ValueError), (2.0, TypeError), (None, TypeError)):
        with pytest.raises(error, match="num_features must be"):
            spnn.BatchNorm(n)
    linear = spnn.Linear(np.int64(4), torch.tensor(2), bias=False)
    assert linear.fn.weight.shape == (2, 4) and linear.fn.bias is None and type(linear).__name__ == "Linear"
    bn = spnn.BatchNorm(np.int64(4), eps=1e-3, momentum=None)
    assert bn.num_features == 4 and bn.eps == 1e-3 and bn(line()).feats.shape == (3, 4)


@pytest.mark.parametrize("feats, module", [
    (torch.bfloat16, lambda: spnn.Linear(4, 2)),
    (torch.float16, lambda: spnn.Linear(4, 2)),
    (torch.float32, lambda: spnn.Linear(4, 2).double()),
    (torch.bfloat16, lambda: spnn.VoxelPrune(0.5, score="learned", in_channels=4)),
    (torch.float16, lambda: spnn.VoxelPrune(0.5, score="learned", in_channels=4)),
    (torch.bfloat16, lambda: spnn.VoxelSkip(spnn.ReLU(), 0.5, score="learned", in_channels=4)),
    (torch.bfloat16, lambda: spnn.BatchNorm(4).double()),
    (torch.float32, lambda: spnn.BatchNorm(4).bfloat16()),
    (torch.float64, lambda: spnn.BatchNorm(4)),
])
def test_a_dtype_mismatch_with_the_parameters_is_a_clear_type_error(feats, module):
    with pytest.raises(TypeError, match=f"the input's feats are {feats} but its parameters"):
        module()(line(dtype=feats))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_masked_linear_moved_to_another_dtype_runs(dtype):
    """spnn.Linear checked the feats against its inner layer's weight before
    that layer's forward: pruned with torch's methods, the weight there is
    the product its pre-hook computed at the last forward, still float32
    after .half(): the first forward refused the half feats ('feats are
    torch.float16 but its parameters torch.float32'). It checks the stored
    weight (weight_orig) now, and the layer runs in the new dtype."""
    layer = spnn.Linear(4, 2)
    ps.prune.l1_unstructured(layer.fn, "weight", amount=0.5)
    x = line()
    want = layer(x).feats
    moved = layer.to(dtype)
    got = moved(x.with_feats(x.feats.to(dtype))).feats
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)
    with pytest.raises(TypeError, match=f"the input's feats are torch.float32 but its parameters {dtype}"):
        moved(x)


def test_the_dtype_mixes_torch_takes_still_run():
    for dtype in (torch.bfloat16, torch.float16):  # low-precision feats on float32 statistics
        assert spnn.BatchNorm(4)(line(dtype=dtype)).feats.dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert spnn.Linear(4, 2)(line()).feats.dtype == torch.bfloat16


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_under_autocast_the_dtype_mixes_torch_refuses_are_a_type_error(low):
    """Under torch.autocast the layers skipped their feats / parameters dtype check ("autocast is torch's
    to mix"), but autocast casts no float64 tensor and leaves batch norm to its own dtype rule: float64
    feats into a float32 Linear (or learned VoxelPrune score), float32 feats into a float64 one, or float32
    feats into a bf16 / float64 BatchNorm, failed inside torch ("mat1 and mat2 must have the same dtype",
    "mixed dtype (CPU): all inputs must share same datatype"). They are the TypeError naming both dtypes
    now; the mixes autocast (or batch norm) does take still run."""
    x = line(n=6)
    refused = [(spnn.Linear(4, 2), torch.float64), (spnn.Linear(4, 2).double(), torch.float32),
               (spnn.VoxelPrune(0.5, score="learned", in_channels=4), torch.float64),
               (spnn.BatchNorm(4), torch.float64), (spnn.BatchNorm(4).to(torch.bfloat16), torch.float32),
               (spnn.BatchNorm(4).double(), low)]
    with torch.autocast("cpu", dtype=low):
        for module, dtype in refused:
            with pytest.raises(TypeError, match=f"the input's feats are {dtype} but its parameters"):
                module(x.with_feats(x.feats.to(dtype)))
        for module, dtype in [(spnn.Linear(4, 2), torch.float32), (spnn.Linear(4, 2).to(torch.float16), torch.bfloat16),
                              (spnn.Linear(4, 2).double(), torch.float64), (spnn.BatchNorm(4), low),
                              (spnn.BatchNorm(4).to(low), low), (spnn.Conv3d(4, 2, 3), torch.float64)]:
            module(x.with_feats(x.feats.to(dtype)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_pruned_linear_or_learned_score_converted_takes_feats_of_its_new_dtype(dtype):
    """A pointsparse Linear (or a learned VoxelPrune score) whose torch Linear is pruned
    (``torch.nn.utils.prune``: weight_orig and a mask), then converted (``.double()``, ``.to(bf16)``),
    refused feats of the new dtype ("the input's feats are torch.float64 but its parameters
    torch.float32"): the check read the weight the pruning hook last computed, which the hook recomputes
    from weight_orig only when the inner Linear runs, after the check. It reads weight_orig's dtype now."""
    import torch.nn.utils.prune as torch_prune

    torch.manual_seed(0)
    linear, score = spnn.Linear(4, 2), spnn.VoxelPrune(0.5, score="learned", in_channels=4)
    for module in (linear.fn, score.scorer):
        torch_prune.l1_unstructured(module, "weight", amount=0.5)
    x = line(n=6)
    assert linear(x).feats.dtype == torch.float32 and len(score(x)) == 3  # (the hooks computed float32 weights)
    for module in (linear, score):
        module.to(dtype)
    got = linear(x.with_feats(x.feats.to(dtype))).feats
    assert got.dtype == dtype
    torch.testing.assert_close(got, torch.nn.functional.linear(x.feats.to(dtype), linear.fn.weight, linear.fn.bias))
    assert len(score(x.with_feats(x.feats.to(dtype)))) == 3
    with pytest.raises(TypeError, match=f"the input's feats are torch.float32 but its parameters {dtype}"):
        linear(x)


@pytest.mark.parametrize("make", [spnn.VoxelPrune, lambda *a, **k: spnn.VoxelSkip(spnn.ReLU(), *a, **k)])
def test_voxel_prune_takes_numpy_and_tensor_scalars(make):
    for ratio, want in [(np.float32(0.5), 0.5), (torch.tensor(0.5), 0.5), (np.int64(1), 1.0), (np.float64(0.25), 0.25)]:
        prune = make(ratio)
        prune = getattr(prune, "prune", prune)
        assert type(prune.keep_ratio) is float and prune.keep_ratio == want
    prune = make(threshold=np.float32(0.5))
    prune = getattr(prune, "prune", prune)
    assert type(prune.threshold) is float and prune.threshold == 0.5
    prune = make(0.5, score="learned", in_channels=np.int64(4))
    prune = getattr(prune, "prune", prune)
    assert prune.scorer.in_features == 4
    assert len(make(torch.tensor(0.5))(line(4))) in (2, 4)  # VoxelPrune keeps 2 rows, VoxelSkip all 4
    for ratio in (np.float32(0), np.float64(1.5), np.float32("nan")):
        with pytest.raises(ValueError, match="keep_ratio must be a number in"):
            make(ratio)
    for ratio in (True, np.bool_(True), torch.tensor([0.5]), "0.5", None):  # (not numbers: as threshold's)
        with pytest.raises(TypeError, match="keep_ratio must be a number in"):
            make(ratio)
    for threshold in (True, np.bool_(True), "1", torch.tensor([0.5])):
        with pytest.raises(TypeError, match="threshold must be a number or None"):
            make(threshold=threshold)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        make(threshold=np.float32("inf"))
    for channels, error in ((np.int64(0), ValueError), (np.float32(4), TypeError), (True, TypeError),
                            (None, TypeError)):
        with pytest.raises(error, match="needs in_channels, a positive int"):
            make(0.5, score="learned", in_channels=channels)


def test_keep_per_batch_takes_numpy_and_tensor_ratios():
    scores, batch = torch.tensor([3.0, 1.0, 2.0, 0.0]), torch.zeros(4, dtype=torch.int32)
    for ratio in (np.float32(0.5), torch.tensor(0.5), 0.5):
        assert F.keep_per_batch(scores, batch, ratio).tolist() == [0, 2]
    with pytest.raises(TypeError, match="keep_ratio must be a number in"):
        F.keep_per_batch(scores, batch, np.bool_(True))


def test_fold_batchnorm_names_the_argument_of_the_wrong_type():
    with pytest.raises(TypeError, match="conv must be a pointsparse.nn.Conv3d; got Linear"):
        spnn.fold_batchnorm(torch.nn.Linear(4, 8), spnn.BatchNorm(8))
    with pytest.raises(TypeError, match="conv must be a pointsparse.nn.Conv3d; got BatchNorm"):
        spnn.fold_batchnorm(spnn.BatchNorm(8), spnn.Conv3d(4, 8))
    with pytest.raises(TypeError, match="bn must be a pointsparse.nn.BatchNorm .*; got Conv3d"):
        spnn.fold_batchnorm(spnn.Conv3d(4, 8), spnn.Conv3d(8, 8))
    conv, bn = spnn.Conv3d(4, 8), torch.nn.BatchNorm1d(8)  # a torch BatchNorm1d folds as well
    spnn.fold_batchnorm(conv, bn.eval())
    assert conv.bias is not None and conv.bias.shape == (8,)


def test_conv_flags_must_be_bools():
    """Conv3d's bias / transposed and conv3d's transposed / relu are flags:
    a string or a number is a TypeError naming it (transposed="False" ran
    the transposed conv: at stride 1 other values, silently; relu="no" ran
    the ReLU); numpy bools are taken."""
    x = line()
    w = torch.randn(27, 4, 2)
    for name, value in (("transposed", "False"), ("transposed", 0), ("bias", "no")):
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            spnn.Conv3d(4, 2, **{name: value})
    for name, value in (("transposed", "False"), ("relu", "no"), ("relu", 1)):
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            F.conv3d(x, w, 3, **{name: value})
    conv = spnn.Conv3d(4, 2, bias=np.True_, transposed=np.False_)
    assert conv.bias is not None and conv.transposed is False
    torch.testing.assert_close(F.conv3d(x, w, 3, transposed=np.False_, relu=np.False_).feats, F.conv3d(x, w, 3).feats)


def test_batchnorm_without_tensors_checks_its_channels():
    """A BatchNorm with neither affine parameters nor running statistics
    checks the feats' channels against num_features too (it normalised 3
    channels as BatchNorm(4), silently)."""
    x = line(5, 3)
    with pytest.raises(ValueError, match="feats have 3 channels but num_features is 4"):
        spnn.BatchNorm(4, affine=False, track_running_stats=False)(x)
    assert spnn.BatchNorm(3, affine=False, track_running_stats=False)(x).feats.shape == (5, 3)
